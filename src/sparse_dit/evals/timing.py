"""Timing that can be quoted: warm-up first, then the median of repetitions, synchronising CUDA."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], reps: int = 5, warmup: int = 1, device: torch.device | str = "cpu") -> float:
    """Median wall time of `fn()` over `reps` calls after `warmup` untimed calls."""
    return statistics.median(interleaved_seconds({"fn": fn}, reps, warmup, device)["fn"])


def interleaved_seconds(
    fns: dict[str, Callable[[], object]], reps: int = 5, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Wall times of each function over `reps` rounds, every round calling all of them in turn.

    Interleaving puts a burst of load from a neighbour on a shared machine into one round of every function
    rather than into all repetitions of one, so medians and per-round differences stay comparable.
    """
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times
