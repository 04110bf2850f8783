"""The demo model's commands: `sparse-dit demo`, `score-demo`, `train-demo` and `distill`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli.args import add_command, add_video, given, parse_options, video_call
from ..errors import ConfigError


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil

    from ..evals.runner import EvalSettings, Evaluation
    from ..evals.video import side_by_side, write_video
    from ..patterns import resolve_config
    from . import load_demo_pipeline
    from .clips import parse_caption

    parse_caption(args.prompt)  # unknown words fail here, listing the vocabulary, before anything loads
    config = resolve_config(args.method, **parse_options(args.options))
    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = Path(args.out)
    for stale in (out / "results.json", out / "videos"):  # a demo is one fresh comparison, never resumed
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    call = video_call(args)
    settings = EvalSettings(out=out, methods=[args.method], prompts=[args.prompt], call_kwargs=call, reps=1, warmup=1)
    evaluation = Evaluation(pipe, settings)
    print(f"sparse-dit demo: the shipped demo model, {args.num_frames}x{args.height}x{args.width} pixels, "
          f"{args.steps} steps, '{args.prompt}', seed {args.seed}; dense, then {config.method} (each after a warm-up run)")
    dense, dense_record = evaluation.dense(0, args.prompt, args.seed)
    sparse, record = evaluation.method(args.method, config, 0, args.prompt, args.seed, dense, dense_record)
    comparison = side_by_side(dense, sparse)
    videos = [write_video(comparison, out / f"side_by_side.{suffix}") for suffix in ("mp4", "gif")]
    keys = ("method", "prompt", "seed", "config", "density", "density_all_steps", "attention_s", "total_s",
            "attention_speedup", "speedup", "psnr", "ssim")
    summary = {key: record[key] for key in keys} | {"dense_attention_s": dense_record["attention_s"],
                                                   "dense_total_s": dense_record["total_s"], "call": call}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    if record["sparse_calls"] == 0:
        print(f"method {config.method}: nothing ran sparse; every attention call stayed dense (min_seq_len="
              f"{config.min_seq_len} tokens, dense_steps={config.dense_steps}, dense_layers={config.dense_layers}), "
              "so there is no density or speed-up to report")
    else:
        print(f"method {config.method}: density {record['density']:.3f} over the attention calls that ran a plan "
              f"({record['density_all_steps']:.3f} over all, dense steps and layers included)")
        print(f"attention time: dense {dense_record['attention_s']:.2f} s, sparse {record['attention_s']:.2f} s "
              f"({record['attention_speedup']:.2f}x)")
        print(f"end-to-end:     dense {dense_record['total_s']:.2f} s, sparse {record['total_s']:.2f} s "
              f"({record['speedup']:.2f}x)")
    print(f"PSNR sparse vs dense: {record['psnr']:.2f} dB, SSIM {record['ssim']:.3f}")
    print(f"wrote {videos[0]}, {videos[1]} (dense | sparse | 4x difference), {out / 'summary.json'}")
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    from .train import DEFAULT_STAGES, Stage, train_demo

    stages = [Stage.parse(s) for s in (args.stages or DEFAULT_STAGES).split(",")]
    model = given(coverage=args.coverage, text_layers=args.text_layers)
    ramp = tuple(int(x) for x in args.qk_gain_ramp.split(":")) if args.qk_gain_ramp else None
    summary = train_demo(Path(args.out), stages, seed=args.seed, device=args.device, model=model,
                         **given(lr=args.lr, qk_gain=args.qk_gain, qk_gain_ramp=ramp, train_qk_gain=args.train_qk_gain))
    print(f"trained {sum(s.steps for s in stages)} steps in {summary['seconds'] / 60:.1f} min, "
          f"final loss {summary['final_loss']:.4f}; saved to {args.out}")
    return 0


def parse_key_values(items: list[str]) -> dict:
    """KEY=VALUE strings -> {key: value}; values are JSON where they parse (lists become tuples), else strings."""
    options = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config expects KEY=VALUE (e.g. radius=8 or window=[3,5,5]), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare word such as backend=reference
        options[key] = tuple(value) if isinstance(value, list) else value
    return options


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import DistillSettings, distill

    settings = DistillSettings(**given(steps=args.steps, batch=args.batch, num_frames=args.num_frames, height=args.height,
                                       width=args.width, samples=args.samples, sample_steps=args.sample_steps,
                                       validation=args.validation, lr=args.lr, checkpoint_every=args.checkpoint_every,
                                       seed=args.seed, noise_levels=args.noise_levels,
                                       attention_loss=args.attention_loss, train=args.train,
                                       student_states_every=args.student_states_every,
                                       rollout_steps=args.rollout_steps, rollout_lr=args.rollout_lr,
                                       train_warmup=args.train_warmup))
    record = distill(Path(args.out), args.method, parse_key_values(args.config), teacher=args.teacher,
                     settings=settings, device=args.device)
    first, last = record["validation"][0]["loss"], record["validation"][-1]["loss"]
    loss = "" if first is None else f"; validation MSE against the dense teacher {first:.3g} -> {last:.3g}"
    if record.get("rollout_validation"):
        losses = " -> ".join(f"{r['loss']:.3g}" for r in record["rollout_validation"])
        loss += f"; final-clip MSE of the held-out rollout {losses} (start, after --steps, after --rollout-steps)"
    density = "every step dense" if record["density"] is None else f"density {record['density']:.3f}"
    print(f"distilled {settings.steps} steps onto {record['method']} ({density} on its sparse steps) in "
          f"{record['total_seconds'] / 60:.1f} min{loss}; saved to {args.out} (load with "
          "sparse_dit.demo.distill.load_distilled)")
    return 0


def cmd_score_demo(args: argparse.Namespace) -> int:
    from . import load_demo_pipeline
    from .evaluate import (CAPTIONS, HELD_OUT_CAPTIONS, motion_from_noise, pass_rate,
                                                    predictions_by_noise, sample_sheet)
    from .pipeline import DEFAULT_GUIDANCE

    pipe = load_demo_pipeline(args.path)
    pipe.set_progress_bar_config(disable=True)
    report = {}
    if args.noise_figure:
        image, errors = predictions_by_noise(pipe)
        Path(args.noise_figure).parent.mkdir(parents=True, exist_ok=True)
        image.save(args.noise_figure)
        report["x0_mse_by_noise"] = errors
        print(f"clean-clip predictions by noise level -> {args.noise_figure}; MSE: "
              + ", ".join(f"t={t}: {e:.4f}" for t, e in errors.items()))
        report["motion_from_noise"] = motion_from_noise(pipe)
        print(f"motion known from pure noise: {report['motion_from_noise']:.2f} of the captioned shift")
    call = {"num_inference_steps": args.steps, "num_frames": args.num_frames, "height": args.size, "width": args.size,
            "guidance_scale": args.guidance_scale if args.guidance_scale is not None else DEFAULT_GUIDANCE}
    report["call"] = call
    if args.samples_figure:
        Path(args.samples_figure).parent.mkdir(parents=True, exist_ok=True)
        sample_sheet(pipe, **call).save(args.samples_figure)
        print(f"one clip per caption (seed 1000, frames 0, 5, 10, 15) -> {args.samples_figure}")
    for name, captions, seeds in (("seen", CAPTIONS, args.seeds), ("held_out", HELD_OUT_CAPTIONS, args.held_out_seeds)):
        if not seeds:
            continue
        rate = pass_rate(pipe, captions, seeds=seeds, batch=args.batch, **call)
        report[name] = {"overall": rate.overall, "per_caption": rate.per_caption, "seeds": seeds}
        print(f"{name}: {rate.overall:.0%} of {len(captions)} captions x {seeds} seeds pass")
        for caption, share in rate.per_caption.items():
            print(f"  {share:4.0%}  {caption}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    demo = add_command(sub, "demo", help="generate a clip dense and sparse from the same seed and compare them",
                       example="""sparse-dit demo --method window --options '{"window": [3, 7, 7]}' """
                               "--prompt 'a red circle moving left' --out outputs/demo")
    # svg2 at 32 frames: the registered method with the best PSNR against dense among those 1.5x or more faster end
    # to end on 2 CPU cores (docs/demo_model.md). At the model's own 16 frames attention is too small a share of the
    # run for any dynamic method to reach 1.5x there.
    demo.add_argument("--method", default="svg2", help="sparse method (see `sparse-dit methods`)")
    demo.add_argument("--options", default=None,
                      help='method options as a JSON object, e.g. \'{"window": [3, 7, 7]}\' (default: the method\'s own)')
    demo.add_argument("--prompt", default="a yellow circle moving down", help="a caption in the demo vocabulary")
    demo.add_argument("--out", default="outputs/demo", help="output folder")
    demo.add_argument("--seed", type=int, default=0, help="the generator seed")
    add_video(demo, steps=20, frames=32, height=64, width=64)
    demo.set_defaults(func=cmd_demo)

    score = add_command(sub, "score-demo", help="share of demo clips that move as captioned (pixel scorer)",
                        example="sparse-dit score-demo --seeds 20 --held-out-seeds 10 --json outputs/score.json")
    score.add_argument("--path", default=None, help="a trained pipeline folder (default: the shipped weights)")
    score.add_argument("--seeds", type=int, default=20, help="new seeds per caption (1000, 1001, ...)")
    score.add_argument("--held-out-seeds", type=int, default=20, help="seeds per held-out caption (0 skips them)")
    score.add_argument("--steps", type=int, default=20, help="denoising steps")
    score.add_argument("--guidance-scale", type=float, default=None,
                       help="classifier-free guidance scale (default: the pipeline's own)")
    score.add_argument("--num-frames", type=int, default=16, help="frames per clip")
    score.add_argument("--size", type=int, default=64, help="height and width in pixels")
    score.add_argument("--batch", type=int, default=10, help="clips generated per pipeline call")
    score.add_argument("--json", default=None, help="write the rates to this file (default: print only)")
    score.add_argument("--noise-figure", default=None,
                       help="also write a PNG of the model's clean-clip predictions from noise levels 0.3-0.98 "
                            "(default: none)")
    score.add_argument("--samples-figure", default=None,
                       help="also write a PNG of one clip per caption (5 seen, 2 held out; seed 1000, frames 0, 5, 10, "
                            "15) (default: none)")
    score.set_defaults(func=cmd_score_demo)

    train = add_command(sub, "train-demo", help="train the demo model from scratch on procedural clips (CPU)",
                        example="sparse-dit train-demo --out outputs/demo-model --seed 0")
    train.add_argument("--out", required=True, help="folder to save the pipeline to (save_pretrained)")
    train.add_argument("--stages", default=None,
                       help="comma-separated FRAMESxSIZE:BATCH:STEPS stages, run in order (default: those of the "
                       "shipped weights, sparse_dit.demo.train.DEFAULT_STAGES)")
    train.add_argument("--seed", type=int, default=0, help="seed of the weights, data and noise")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (default: that of the shipped weights)")
    train.add_argument("--qk-gain", type=float, default=None,
                       help="scale the self-attention QK-norm gains up to this (default: that of the shipped weights)")
    train.add_argument("--qk-gain-ramp", default=None, metavar="START:END",
                       help="optimiser steps over which the gains rise linearly from 1 to --qk-gain (default: that "
                            "of the shipped weights)")
    train.add_argument("--train-qk-gain", action=argparse.BooleanOptionalAction, default=None,
                       help="let the optimiser move the scaled gains too (by default they follow the ramp alone)")
    train.add_argument("--device", default="cpu", help="torch device to train on (the shipped weights were trained on cpu)")
    train.add_argument("--coverage", action=argparse.BooleanOptionalAction, default=None,
                       help="also denoise a channel of object coverage, a colour-free mask (default: on, as the shipped "
                       "weights; docs/demo_model.md)")
    train.add_argument("--text-layers", type=int, default=None,
                       help="T5 encoder layers (default 0, as the shipped weights: each caption word stays unmixed)")
    train.set_defaults(func=cmd_train_demo)

    distill = add_command(sub, "distill",
                          help="fine-tune the demo model's self-attention so that it matches its dense self under a "
                               "static sparse method (CLEAR's distillation)",
                          example="sparse-dit distill --method clear --config radius=0.25 temporal_extent=0.125 "
                                  "--out outputs/distill-clear")
    distill.add_argument("--method", required=True,
                         help="a registered static method: clear, window, gna, ... (see `sparse-dit methods`)")
    distill.add_argument("--config", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                         help="method options, values as JSON, e.g. radius=8 window=[3,5,5] (default: the method's own)")
    distill.add_argument("--out", required=True,
                         help="output folder: the pipeline (save_pretrained), distill.json, loss_curve.svg, checkpoints")
    distill.add_argument("--teacher", default=None,
                         help="the model to distil: concentrated, diffuse or a train-demo folder (default: the shipped "
                              "demo weights)")
    distill.add_argument("--steps", type=int, default=None, help="optimiser steps (default: 400)")
    distill.add_argument("--batch", type=int, default=None, help="examples per step (default: 1)")
    distill.add_argument("--num-frames", type=int, default=None, help="frames of the teacher's clips (default: 16)")
    distill.add_argument("--height", type=int, default=None, help="clip height in pixels (default: 64)")
    distill.add_argument("--width", type=int, default=None, help="clip width in pixels (default: 64)")
    distill.add_argument("--samples", type=int, default=None, help="clips the teacher generates to distil on (default: 8)")
    distill.add_argument("--sample-steps", type=int, default=None,
                         help="denoising steps of the teacher's clips (default: 20)")
    distill.add_argument("--validation", type=int, default=None,
                         help="held-out examples the loss is also measured on at each checkpoint (default: 4)")
    distill.add_argument("--lr", type=float, default=None, help="AdamW peak learning rate, warmed up over 10%% of the steps then cosine-decayed to 0 (default: 0.0002)")
    distill.add_argument("--checkpoint-every", type=int, default=None,
                         help="steps between checkpoint-<step> folders, 0 for none (default: 100)")
    distill.add_argument("--seed", type=int, default=None, help="seed of captions, noise and noise levels (default: 0)")
    distill.add_argument("--noise-levels", choices=("sparse", "all", "trajectory"), default=None, metavar="LEVELS",
                         help="what to distil on: sparse, the teacher's clips noised to the sampler's levels at the steps "
                              "the pattern runs after the dense warm-up of --sample-steps; all, noised as the demo was "
                              "trained; or trajectory, the teacher sampler's own states at those steps; sparse and "
                              "trajectory take the warm-up's steps too with --train-warmup (default: sparse)")
    distill.add_argument("--attention-loss", type=float, default=None, metavar="WEIGHT",
                         help="weight of CLEAR's second loss term, each self-attention output against the dense "
                              "teacher's as a relative MSE, mean over the layers; 0 for the clean-clip loss alone (default: 0.0)")
    distill.add_argument("--train", choices=("self", "all"), default=None, metavar="WHICH",
                         help="which attention weights learn: self, the self-attention the pattern replaces; or all, "
                              "also the cross-attention to the caption (default: self)")
    distill.add_argument("--rollout-steps", type=int, default=None, metavar="STEPS",
                         help="with --noise-levels trajectory: STEPS more steps after --steps, each running the student's "
                              "whole sparse sampling from the teacher's state after the dense warm-up and regressing its "
                              "final clip onto the teacher's (default: 0)")
    distill.add_argument("--rollout-lr", type=float, default=None, help="peak learning rate of the rollout steps (default: 0.0003)")
    distill.add_argument("--student-states-every", type=int, default=None, metavar="STEPS",
                         help="with --noise-levels trajectory: every STEPS steps the student regenerates the captions with "
                              "its pattern on and its own sampler states, with the teacher's predictions there, become half "
                              "the examples; 0 for the teacher's states alone (default: 0)")
    distill.add_argument("--train-warmup", action=argparse.BooleanOptionalAction, default=None,
                         help="with --noise-levels sparse or trajectory, also train the steps of the method's dense "
                              "warm-up, run dense as at inference, since the fine-tuned weights run them too (default: "
                              "off)")
    distill.add_argument("--device", default="cpu", help="torch device")
    distill.set_defaults(func=cmd_distill)
