"""The `sparse-dit` command."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil

    from sparse_dit.evals.runner import EvalSettings, Evaluation
    from sparse_dit.evals.video import side_by_side, write_video
    from sparse_dit.patterns import resolve_config
    from sparse_dit.pipelines.demo import load_demo_pipeline
    from sparse_dit.pipelines.demo.clips import parse_caption

    parse_caption(args.prompt)  # unknown words fail here, listing the vocabulary, before anything loads
    config = resolve_config(args.method, **(json.loads(args.options) if args.options else {}))
    pipe = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    out = Path(args.out)
    for stale in (out / "results.json", out / "videos"):  # a demo is one fresh comparison, never resumed
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    call = {"num_frames": args.num_frames, "height": args.height, "width": args.width, "num_inference_steps": args.steps,
            **_given(guidance_scale=args.guidance_scale)}
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
    print(f"method {config.method}: density {record['density']:.3f} over the attention calls that ran a plan "
          f"({record['density_all_steps']:.3f} over all, dense steps and layers included)")
    print(f"attention time: dense {dense_record['attention_s']:.2f} s, sparse {record['attention_s']:.2f} s "
          f"({record['attention_speedup']:.2f}x)")
    print(f"end-to-end:     dense {dense_record['total_s']:.2f} s, sparse {record['total_s']:.2f} s ({record['speedup']:.2f}x)")
    print(f"PSNR sparse vs dense: {record['psnr']:.2f} dB, SSIM {record['ssim']:.3f}")
    print(f"wrote {videos[0]}, {videos[1]} (dense | sparse | 4x difference), {out / 'summary.json'}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from sparse_dit.patterns import registered_methods

    for name, cls in registered_methods().items():
        print(f"{name:10s} {cls.description}")
        print(f"{'':10s} options: {', '.join(cls.config_cls.option_names())}")
    return 0


def _given(**options):
    """The options set on the command line (not None); the callee's own defaults apply to the rest."""
    return {k: v for k, v in options.items() if v is not None}


def _prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompts (one per line), or the evaluation's three."""
    from sparse_dit.evals.runner import DEFAULT_PROMPTS

    return [l.strip() for l in Path(args.prompts).read_text().splitlines() if l.strip()] if args.prompts else list(DEFAULT_PROMPTS)


def _sizes(args: argparse.Namespace) -> dict:
    """--num-frames, --height and --width as pipeline-call arguments, where given."""
    return {k: v for k, v in (("num_frames", args.num_frames), ("height", args.height), ("width", args.width)) if v}


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sparse_dit.evals.bench_kernels import cases, format_table, run_case

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    todo = cases(args.seq, args.head_dim, args.density, args.block, args.backend, args.heads, args.dtype)
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


def _parse_configs(items: list[str]) -> dict[str, dict]:
    """METHOD.KEY=VALUE strings -> {method: {key: value}}; values are JSON where they parse, else strings."""
    configs: dict[str, dict] = {}
    for item in items:
        target, sep, raw = item.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--config expects METHOD.KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        configs.setdefault(method, {})[key] = tuple(value) if isinstance(value, list) else value
    return configs


def load_pipeline(name: str):
    """`demo` or a local diffusers folder / cached hub id (never downloaded). Returns (pipeline, description)."""
    if name == "demo" or name.startswith("demo:"):
        from sparse_dit.pipelines.demo import load_demo_pipeline

        variant = name.partition(":")[2] or "concentrated"
        return load_demo_pipeline(variant), f"the shipped demo model ({variant})"
    index = Path(name) / "model_index.json"
    if index.exists() and json.loads(index.read_text()).get("_class_name") == "ShapesVideoPipeline":
        from sparse_dit.pipelines.demo import load_demo_pipeline

        return load_demo_pipeline(name), f"demo model from {name}"
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(name, local_files_only=True), name


def cmd_eval(args: argparse.Namespace) -> int:
    from sparse_dit.evals.report import markdown, write_reports
    from sparse_dit.evals.runner import EvalSettings, Evaluation

    pipe, description = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    prompts = _prompts(args)
    call = {"num_inference_steps": args.steps}
    call.update(_sizes(args))
    call.update(_given(guidance_scale=args.guidance_scale))
    settings = EvalSettings(
        out=Path(args.out), methods=args.methods, configs=_parse_configs(args.config), prompts=prompts,
        seeds=args.seeds, call_kwargs=call, reps=args.reps, warmup=args.warmup, controls=args.controls,
    )
    records = Evaluation(pipe, settings).run()
    title = f"sparse-dit evaluation: {description}"
    md, page = write_reports(records, settings.out, title)
    print(markdown(records, title))
    print(f"wrote {settings.out / 'results.json'}, {md}, {page}")
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    from sparse_dit.pipelines.demo.train import DEFAULT_STAGES, Stage, train_demo

    stages = [Stage.parse(s) for s in (args.stages or DEFAULT_STAGES).split(",")]
    model = _given(coverage=args.coverage, text_layers=args.text_layers)
    ramp = tuple(int(x) for x in args.qk_gain_ramp.split(":")) if args.qk_gain_ramp else None
    summary = train_demo(Path(args.out), stages, seed=args.seed, device=args.device, model=model,
                         **_given(lr=args.lr, qk_gain=args.qk_gain, qk_gain_ramp=ramp, train_qk_gain=args.train_qk_gain))
    print(f"trained {sum(s.steps for s in stages)} steps in {summary['seconds'] / 60:.1f} min, "
          f"final loss {summary['final_loss']:.4f}; saved to {args.out}")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from sparse_dit.evals.locality_report import write_locality_report

    pipe, description = load_pipeline(args.pipeline)
    call = {"prompt": args.prompt, "num_inference_steps": args.steps,
            "generator": torch.Generator().manual_seed(args.seed), "output_type": "pt"}
    call.update(_sizes(args))
    call.update(_given(guidance_scale=args.guidance_scale))
    steps = args.sample_steps or [args.steps // 2]
    write_locality_report(pipe, Path(args.out), call, steps=steps, window=tuple(args.window), rows=args.rows,
                          heads=args.maps, compare_untrained=not args.no_untrained, seed=args.seed)
    print(f"{description}: attention mass inside a {'x'.join(map(str, args.window))} token window, steps {steps}")
    print((Path(args.out) / "locality.md").read_text())
    print(f"wrote {Path(args.out) / 'locality.json'}, {Path(args.out) / 'attention_maps.png'}")
    return 0


def cmd_concentration(args: argparse.Namespace) -> int:
    from sparse_dit.patterns import resolve_config
    from sparse_dit.search import measure_concentration

    pipe, description = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    prompts = _prompts(args)
    call = {"num_inference_steps": args.steps, "output_type": "pt"}
    call.update(_sizes(args))
    call.update(_given(guidance_scale=args.guidance_scale))
    first = resolve_config("dense", dense_steps=args.dense_steps).dense_step_count(args.steps)
    calls = [{**call, "prompt": p, "generator": torch.Generator().manual_seed(s)} for p in prompts for s in range(args.seeds)]
    result = measure_concentration(pipe, calls, steps=range(first, args.steps), fraction=args.fraction,
                                   block_size=args.block_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concentration.json").write_text(json.dumps(
        {"pipeline": description, "prompts": prompts, "seeds": args.seeds, "call": call, **result.to_dict()}, indent=1))
    (out / "concentration.md").write_text(result.markdown())
    result.draw().save(out / "block_mass_maps.png")
    print(f"{description}, {len(prompts)} prompts x {args.seeds} seeds")
    print(result.markdown())
    print(f"wrote {out / 'concentration.json'}, {out / 'concentration.md'}, {out / 'block_mass_maps.png'}")
    return 0


def cmd_score_demo(args: argparse.Namespace) -> int:
    from sparse_dit.pipelines.demo import load_demo_pipeline
    from sparse_dit.pipelines.demo.evaluate import (CAPTIONS, HELD_OUT_CAPTIONS, motion_from_noise, pass_rate,
                                                    predictions_by_noise, sample_sheet)
    from sparse_dit.pipelines.demo.pipeline import DEFAULT_GUIDANCE

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-dit", description="Sparse attention for diffusers DiT pipelines.")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module (a dotted name or a .py file) before the command, so that the methods "
                             "it registers with sparse_dit.register_method can be named; repeatable")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate a clip dense and sparse from the same seed and compare them")
    demo.add_argument("--method", default="window", help="sparse method (see `sparse-dit methods`)")
    demo.add_argument("--options", default=None, help='method options as JSON, e.g. \'{"window": [3, 7, 7]}\'')
    demo.add_argument("--prompt", default="a yellow circle moving down", help="a caption in the demo vocabulary")
    demo.add_argument("--out", default="outputs/demo", help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--num-frames", type=int, default=16)
    demo.add_argument("--height", type=int, default=64)
    demo.add_argument("--width", type=int, default=64)
    demo.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's own")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="what", required=True)
    kern = bench.add_parser("kernels", help="dense SDPA vs the sparse path on random block layouts, in one run")
    kern.add_argument("--seq", type=_csv(int), default=[8192, 16384, 32768], help="comma-separated sequence lengths")
    kern.add_argument("--head-dim", type=_csv(int), default=[64])
    kern.add_argument("--density", type=_csv(float), default=[0.1, 0.2, 0.3])
    kern.add_argument("--block", type=_csv(int), default=[128])
    kern.add_argument("--backend", type=_csv(str), default=["auto"], help="auto, gather, flex, triton, reference (comma-separated)")
    kern.add_argument("--heads", type=int, default=2)
    kern.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    kern.add_argument("--reps", type=int, default=5)
    kern.add_argument("--warmup", type=int, default=2)
    kern.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    kern.add_argument("--json", default=None, help="write one record per case to this file")
    kern.set_defaults(func=cmd_bench_kernels)

    ev = sub.add_parser("eval", help="score methods against dense on the same prompts and seeds; writes a report")
    ev.add_argument("--pipeline", default="demo", help="demo, demo:diffuse, or a local diffusers pipeline folder / cached id")
    ev.add_argument("--methods", type=_csv(str), default=["dense", "window", "random"],
                    help="comma-separated; dense is the baseline and every method is paired with the --controls")
    ev.add_argument("--controls", type=_csv(str), default=["random", "oracle"],
                    help="yardsticks run at each method's measured density: random (what it must beat), oracle "
                         "(the blocks of highest exact mass; costs full attention); comma-separated, '' for none")
    ev.add_argument("--config", action="append", default=[], help="METHOD.KEY=VALUE (JSON value), repeatable")
    ev.add_argument("--prompts", default=None, help="a text file with one prompt per line")
    ev.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per prompt")
    ev.add_argument("--num-frames", type=int, default=None)
    ev.add_argument("--height", type=int, default=None)
    ev.add_argument("--width", type=int, default=None)
    ev.add_argument("--steps", type=int, default=10)
    ev.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's own")
    ev.add_argument("--reps", type=int, default=1, help="timed repetitions per video (median)")
    ev.add_argument("--warmup", type=int, default=1, help="untimed generations per method before timing")
    ev.add_argument("--out", required=True, help="output folder; rerunning skips finished items")
    ev.set_defaults(func=cmd_eval)

    att = sub.add_parser("attention", help="how local a pipeline's attention is, against its untrained twin; draws maps")
    att.add_argument("--pipeline", default="demo", help="demo, demo:diffuse, or a local diffusers pipeline folder / cached id")
    att.add_argument("--prompt", default="a red circle moving right")
    att.add_argument("--seed", type=int, default=0)
    att.add_argument("--steps", type=int, default=20, help="denoising steps of the run")
    att.add_argument("--sample-steps", type=_csv(int), default=None, help="steps to sample (default: the middle one)")
    att.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's own")
    att.add_argument("--num-frames", type=int, default=None)
    att.add_argument("--height", type=int, default=None)
    att.add_argument("--width", type=int, default=None)
    att.add_argument("--window", type=_csv(int), default=[3, 5, 5], help="frames,rows,columns in tokens")
    att.add_argument("--rows", type=int, default=64, help="query rows sampled per call")
    att.add_argument("--maps", type=int, default=4, help="heads to draw")
    att.add_argument("--no-untrained", action="store_true", help="skip the re-initialised twin")
    att.add_argument("--out", default="outputs/attention")
    att.set_defaults(func=cmd_attention)

    conc = sub.add_parser("concentration", help="mass held by each query block's top key blocks (exact), per layer and head; "
                                                "draws block-mass maps")
    conc.add_argument("--pipeline", default="demo", help="demo, demo:diffuse, or a local diffusers pipeline folder / cached id")
    conc.add_argument("--prompts", default=None, help="a text file with one prompt per line (default: the eval's three)")
    conc.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per prompt")
    conc.add_argument("--steps", type=int, default=20, help="denoising steps of each run")
    conc.add_argument("--dense-steps", type=float, default=0.2,
                      help="leading share of steps left out, as a sparse method's dense warm-up leaves them")
    conc.add_argument("--fraction", type=float, default=0.2, help="share of the key blocks counted")
    conc.add_argument("--block-size", type=int, default=64)
    conc.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's own")
    conc.add_argument("--num-frames", type=int, default=None)
    conc.add_argument("--height", type=int, default=None)
    conc.add_argument("--width", type=int, default=None)
    conc.add_argument("--out", default="outputs/concentration")
    conc.set_defaults(func=cmd_concentration)

    score = sub.add_parser("score-demo", help="share of demo clips that move as captioned (pixel scorer)")
    score.add_argument("--path", default=None, help="a trained pipeline folder (default: the shipped weights)")
    score.add_argument("--seeds", type=int, default=20, help="new seeds per caption (1000, 1001, ...)")
    score.add_argument("--held-out-seeds", type=int, default=20, help="seeds per held-out caption (0 skips them)")
    score.add_argument("--steps", type=int, default=20)
    score.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's own")
    score.add_argument("--num-frames", type=int, default=16)
    score.add_argument("--size", type=int, default=64)
    score.add_argument("--batch", type=int, default=10, help="clips generated per pipeline call")
    score.add_argument("--json", default=None, help="write the rates to this file")
    score.add_argument("--noise-figure", default=None,
                       help="also write a PNG of the model's clean-clip predictions from noise levels 0.3-0.98")
    score.add_argument("--samples-figure", default=None,
                       help="also write a PNG of one clip per caption (5 seen, 2 held out; seed 1000, frames 0, 5, 10, 15)")
    score.set_defaults(func=cmd_score_demo)

    train = sub.add_parser("train-demo", help="train the demo model from scratch on procedural clips (CPU)")
    train.add_argument("--out", required=True, help="folder to save the pipeline to (save_pretrained)")
    train.add_argument("--stages", default=None,
                       help="comma-separated FRAMESxSIZE:BATCH:STEPS stages, run in order (default: those of the "
                       "shipped weights, sparse_dit.pipelines.demo.train.DEFAULT_STAGES)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (default: that of the shipped weights)")
    train.add_argument("--qk-gain", type=float, default=None,
                       help="scale the self-attention QK-norm gains up to this (default: that of the shipped weights)")
    train.add_argument("--qk-gain-ramp", default=None, metavar="START:END",
                       help="optimiser steps over which the gains rise linearly from 1 to --qk-gain")
    train.add_argument("--train-qk-gain", action=argparse.BooleanOptionalAction, default=None,
                       help="let the optimiser move the scaled gains too (by default they follow the ramp alone)")
    train.add_argument("--device", default="cpu", help="torch device to train on (the shipped weights were trained on cpu)")
    train.add_argument("--coverage", action=argparse.BooleanOptionalAction, default=None,
                       help="also denoise a channel of object coverage, a colour-free mask (default: on, as the shipped "
                       "weights; docs/demo_model.md)")
    train.add_argument("--text-layers", type=int, default=None,
                       help="T5 encoder layers (default 0, as the shipped weights: each caption word stays unmixed)")
    train.set_defaults(func=cmd_train_demo)

    methods = sub.add_parser("methods", help="list the registered sparse attention methods and their options")
    methods.set_defaults(func=cmd_methods)
    return parser


def import_user_module(name: str) -> None:
    """Import a dotted module name, or run a .py file as a module, for the methods it registers."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"sparse-dit: --import {name}: no such file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in args.imports:
        import_user_module(name)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
