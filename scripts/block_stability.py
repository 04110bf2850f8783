"""How stable AdaSpa's selected key blocks are across denoising steps, per layer of the demo model.

    OMP_NUM_THREADS=1 python scripts/block_stability.py                       # the demo's 16 frames, 20 steps
    OMP_NUM_THREADS=1 python scripts/block_stability.py --steps 10 --num-frames 8   # a quick check

AdaSpa's premise is that a head's block pattern barely moves across steps, so it searches at a few steps and reuses
the indices in between. This runs the demo pipeline under `adaspa` searching at *every* sparse step (so the run
itself follows the searched blocks) and reports, per layer and averaged over heads:

- `jac prev`: Jaccard overlap |A & B| / |A | B| of the blocks the plans of consecutive searches (one step apart)
  compute, each query block's diagonal included (the demo has no text in self-attention);
- `held prev`: the share of a step's exact block mass that the previous step's blocks hold, i.e. what reusing
  them for one step keeps (the search itself keeps at least the threshold);
- `jac first`, `held first`: the same against the first sparse step's blocks, over every later step, and at
  the last step (what reusing the first search to the end of the run would keep);
- `density`: the mean computed share of the attention map.

The numbers come from `SiteState.extra["searches"]` (`sparse_dit.patterns.adaspa.search_log`), read in a
`callback_on_step_end` before the pipeline call drops its state. `--json FILE` writes every record.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch

from sparse_dit import load_demo_pipeline
from sparse_dit.patterns.adaspa import search_log
from sparse_dit.plugin.api import runtime_of


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=None, help="demo variant ('concentrated', 'diffuse') or a train-demo folder")
    parser.add_argument("--prompt", default="a yellow circle moving down", help="a caption in the demo vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's, 20)")
    parser.add_argument("--num-frames", type=int, default=None, help="frames (default: the pipeline's, 16)")
    parser.add_argument("--threshold", type=float, default=None, help="adaspa cumulative threshold (default: the method's, 0.7)")
    parser.add_argument("--density", type=float, default=None, help="adaspa density instead of a threshold")
    parser.add_argument("--dense-steps", type=float, default=0.2, help="leading dense steps, a fraction (default 0.2)")
    parser.add_argument("--no-head-adaptive", action="store_true", help="the same budget for every head")
    parser.add_argument("--json", default=None, help="write every search record here")
    return parser.parse_args()


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def main() -> None:
    args = parse_args()
    pipe = load_demo_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    options = dict(search_steps=None, compare_first=True, dense_steps=args.dense_steps, head_adaptive=not args.no_head_adaptive)
    if args.threshold is not None:
        options["threshold"] = args.threshold
    if args.density is not None:
        options["density"] = args.density
    pipe.enable_sparse_attention("adaspa", **options)
    log: dict = {}

    def harvest(pipeline, step, timestep, tensors):
        log.update(search_log(runtime_of(pipeline).engine.states))
        return tensors

    call = {"num_inference_steps": args.steps, "num_frames": args.num_frames}
    with torch.no_grad():
        pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), callback_on_step_end=harvest,
             **{key: value for key, value in call.items() if value is not None})
    if not log:
        raise SystemExit("no sparse step searched: more steps, or fewer dense steps (--dense-steps)")

    by_layer: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (site, branch), records in sorted(log.items()):
        row = by_layer[site]
        for record in records:
            row["density"].append(mean(record["density"]))
            if "vs_previous" in record:
                row["jac prev"].append(mean(record["vs_previous"]["jaccard"]))
                row["held prev"].append(mean(record["vs_previous"]["mass_recall"]))
                row["jac first"].append(mean(record["vs_first"]["jaccard"]))
                row["held first"].append(mean(record["vs_first"]["mass_recall"]))
        if len(records) > 1:
            row["held first, last step"].append(mean(records[-1]["vs_first"]["mass_recall"]))
        row["searches"].append(len(records))
    steps = sorted({r["step"] for records in log.values() for r in records})
    print(f"adaspa {options}; prompt {args.prompt!r}, seed {args.seed}; searches at steps {steps}")
    columns = ("jac prev", "held prev", "jac first", "held first", "held first, last step", "density")
    print(f"| site | {' | '.join(columns)} |")
    print("|---" * (len(columns) + 1) + "|")
    for site, row in by_layer.items():
        print(f"| {site} | " + " | ".join(f"{mean(row[c]):.3f}" for c in columns) + " |")
    overall = {c: mean([mean(row[c]) for row in by_layer.values()]) for c in columns}
    print("| all layers | " + " | ".join(f"{overall[c]:.3f}" for c in columns) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"options": options, "prompt": args.prompt, "seed": args.seed,
                       "searches": {f"{site}|{branch}": records for (site, branch), records in log.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
