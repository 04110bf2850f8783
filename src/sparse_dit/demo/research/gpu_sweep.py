"""Compare demo-model training recipes on a GPU: each variant trains in its own process, then is scored.

A GPU runs an hour of the CPU recipe in about a minute, so it answers which recipe to spend the CPU's
90 minutes on. Results are indicative only: the shipped weights are always trained on CPU.

    python -m sparse_dit.demo.research.gpu_sweep --out DIR [--variants A,B] [--seeds 20] [--deadline 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name: (stages, lr)
    "A_ref_49min": ("4x64:8:700,16x64:2:400", 1e-3),
    "B_more16_74min": ("4x64:8:500,16x64:2:1200", 1e-3),
    "C_mix_70min": ("4x64:8:1000,16x64:2:900", 1e-3),
    "D_only16_74min": ("16x64:2:1450", 1e-3),
    "E_more16_lr2e-3": ("4x64:8:500,16x64:2:1200", 2e-3),
    "G_8frames_66min": ("8x64:4:2200", 1e-3),
    "H_16batch4_72min": ("4x64:8:500,16x64:4:600", 1e-3),
}
GUIDANCE = (1.0, 2.0, 3.0)
if os.environ.get("SWEEP_SMOKE"):  # a seconds-long run of the whole script, to check it before spending GPU time
    VARIANTS, GUIDANCE = {"smoke": ("4x64:2:2", 1e-3)}, (1.0,)


def run_variant(name: str, out: Path, seeds: int) -> None:
    import torch

    from sparse_dit.demo.evaluate import CAPTIONS, HELD_OUT_CAPTIONS, pass_rate
    from sparse_dit.demo.pipeline import ShapesVideoPipeline
    from sparse_dit.demo.train import Stage, train_demo

    torch.set_num_threads(2)
    stages, lr = VARIANTS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = train_demo(out / "weights", [Stage.parse(s) for s in stages.split(",")], seed=0, lr=lr, device=device)
    log = summary.pop("log")
    result = {"name": name, "stages": stages, "lr": lr, "train_s": summary["seconds"], "final_loss": summary["final_loss"],
              "mean_step_s": log[-1]["s"] / len(log), "seen": {}, "held_out": {}}
    pipe = ShapesVideoPipeline.from_pretrained(out / "weights").to(device)
    pipe.set_progress_bar_config(disable=True)
    for g in GUIDANCE:
        rate = pass_rate(pipe, CAPTIONS, seeds=seeds, batch=10, guidance_scale=g)
        result["seen"][str(g)] = {"overall": rate.overall, **rate.per_caption}
        (out / "result.json").write_text(json.dumps(result, indent=1))
    best = max(GUIDANCE, key=lambda g: result["seen"][str(g)]["overall"])
    rate = pass_rate(pipe, HELD_OUT_CAPTIONS, seeds=seeds, batch=10, guidance_scale=best)
    result["held_out"] = {"guidance": best, "overall": rate.overall, **rate.per_caption}
    frames = pipe(prompt=list(CAPTIONS), generator=[torch.Generator().manual_seed(1000) for _ in CAPTIONS],
                  guidance_scale=best, output_type="pt").frames  # (5, F, 3, H, W)
    torch.save(frames[:, ::5].cpu(), out / "frames.pt")  # tensors only; read back with weights_only=True
    result["total_s"] = time.time() - START
    (out / "result.json").write_text(json.dumps(result, indent=1))


def sample_sheet(out: Path, names: list[str]) -> None:
    """One PNG: a row per variant, the five seen captions' frames 0, 5, 10, 15 side by side."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    rows = []
    for name in names:
        path = out / name / "frames.pt"
        if not path.exists():
            continue
        frames = torch.load(path, weights_only=True)  # (5, 4, 3, 64, 64)
        tiles = [np.concatenate([(f.permute(1, 2, 0).numpy() * 255).astype(np.uint8) for f in clip], axis=1) for clip in frames]
        row = np.concatenate([np.pad(t, ((0, 0), (0, 6), (0, 0)), constant_values=255) for t in tiles], axis=1)
        label = Image.new("RGB", (row.shape[1], 14), "white")
        ImageDraw.Draw(label).text((2, 1), name, fill="black")
        rows.append(np.concatenate([np.asarray(label), row], axis=0))
    if rows:
        Image.fromarray(np.concatenate(rows, axis=0)).save(out / "samples.png")


START = time.time()

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds until unfinished variants are killed")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_variant(args.one, args.out / args.one, args.seeds)
        sys.exit(0)
    names = args.variants.split(",")
    procs = {}
    for name in names:
        (args.out / name).mkdir(parents=True, exist_ok=True)
        log = open(args.out / name / "log.txt", "w")
        procs[name] = subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--seeds", str(args.seeds), "--one", name],
                                       stdout=log, stderr=subprocess.STDOUT)
    while any(p.poll() is None for p in procs.values()) and time.time() - START < args.deadline:
        time.sleep(2)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
    results = {}
    for name in names:
        path = args.out / name / "result.json"
        results[name] = json.loads(path.read_text()) if path.exists() else None
        if results[name] is None or "total_s" not in results[name]:
            lines = (args.out / name / "log.txt").read_text(errors="replace").replace("\r", "\n").splitlines()
            results[name] = {**(results[name] or {}), "unfinished": True, "log_tail": lines[-4:]}
    (args.out / "sweep.json").write_text(json.dumps(results, indent=1))
    sample_sheet(args.out, names)
    for name, r in results.items():
        print(name, json.dumps({k: v for k, v in r.items() if k in ("train_s", "final_loss", "seen", "held_out", "unfinished", "log_tail")}))
