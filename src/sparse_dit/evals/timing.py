"""Timing that can be quoted: warm-up first, then the median of repetitions; on CUDA with events."""

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
    if cuda:
        # CUDA events on the current stream: the GPU's own clock from before the call's first launch to after its
        # last, host time spent between launches included, without a host clock's synchronisation latency.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
    for _ in range(reps):
        for name, fn in fns.items():
            if cuda:
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times
