"""Timing that can be quoted: warm-up first, then the median of repetitions, synchronising CUDA."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_seconds(fn: Callable[[], object], reps: int = 5, warmup: int = 1, device: torch.device | str = "cpu") -> float:
    """Median wall time of `fn()` over `reps` calls after `warmup` untimed calls."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
