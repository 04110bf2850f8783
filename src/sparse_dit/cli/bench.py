"""`sparse-dit bench kernels`: dense SDPA against the sparse path on random block layouts, in one run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import ConfigError
from .args import add_command, csv


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..evals.bench_kernels import cases, format_table, run_case

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.clusters is not None and (len(args.clusters) != 2 or min(args.clusters) < 1):
        raise ConfigError(f"--clusters takes two positive counts, query and key clusters (e.g. 64,256), got {args.clusters}")
    todo = cases(args.seq, args.head_dim, args.density, args.block, args.backend, args.heads, args.dtype, args.clusters)
    results = []
    for case in tqdm(todo, desc="bench kernels"):
        results.append(run_case(case, device, args.reps, args.warmup))
        if args.json:  # after every case: a run cut short keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=2))
    timer = "CUDA events" if torch.device(device).type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device}, {timer}, {args.dtype}, median of {args.reps} rounds (dense, sparse, bare kernel in turn) after {args.warmup} warm-up")
    print(format_table(results))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    bench = add_command(sub, "bench", help="benchmarks",
                        example="sparse-dit bench kernels --seq 8192 --density 0.1,0.2 --json bench.json")
    kinds = bench.add_subparsers(dest="what", required=True, metavar="WHAT")
    kern = add_command(kinds, "kernels", help="dense SDPA vs the sparse path on random block layouts, in one run",
                       example="sparse-dit bench kernels --seq 8192,16384,32768 --density 0.1,0.2,0.3 --block 128 "
                               "--json bench.json")
    kern.add_argument("--seq", type=csv(int), default=[8192, 16384, 32768], help="comma-separated sequence lengths")
    kern.add_argument("--head-dim", type=csv(int), default=[64], help="comma-separated head dims")
    kern.add_argument("--density", type=csv(float), default=[0.1, 0.2, 0.3],
                      help="comma-separated shares of key blocks each query block visits")
    kern.add_argument("--block", type=csv(int), default=[128], help="comma-separated block sizes in tokens")
    kern.add_argument("--backend", type=csv(str), default=["auto"], help="auto, gather, flex, triton, reference (comma-separated)")
    kern.add_argument("--clusters", type=csv(int), default=None,
                      help="Q,K: also time a variable-block plan of each density with Q query and K key clusters of "
                           "uneven sizes (some empty, some single-token) and report its speed per computed pair "
                           "against the fixed-block plan's (default: fixed blocks only)")
    kern.add_argument("--heads", type=int, default=2, help="attention heads")
    kern.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="tensor dtype")
    kern.add_argument("--reps", type=int, default=5, help="timed rounds per case (median)")
    kern.add_argument("--warmup", type=int, default=2, help="untimed rounds per case first")
    kern.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    kern.add_argument("--json", default=None, help="write one record per case to this file (default: print only)")
    kern.set_defaults(func=cmd_bench_kernels)
