"""`sparse-dit eval`, `attention` and `concentration`: what a method does to a pipeline, and what the
pipeline's own attention looks like."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ..errors import ConfigError
from ..pipelines import load_pipeline
from .args import add_command, add_pipeline, add_prompts, add_video, csv, parse_configs, read_prompts, video_call


def cmd_eval(args: argparse.Namespace) -> int:
    from ..evals import data_parallel
    from ..evals.report import markdown, write_reports
    from ..evals.runner import EvalSettings, Evaluation

    # The flags are read before the pipeline loads, so that a bad one fails at once.
    settings = EvalSettings(
        out=Path(args.out), methods=args.methods, configs=parse_configs(args.config), prompts=read_prompts(args),
        seeds=args.seeds, call_kwargs=video_call(args), reps=args.reps, warmup=args.warmup, controls=args.controls,
    )
    if args.num_processes < 1:
        raise ConfigError(f"--num-processes must be 1 or more, got {args.num_processes}")
    if data_parallel.launched_size() > 1:  # one of the processes torchrun or accelerate launch started
        records, description, against = data_parallel.run_worker(settings, args.pipeline, args.reference)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    elif args.num_processes > 1:
        records, description, against = data_parallel.launch(settings, args.pipeline, args.reference, args.num_processes,
                                                             imports=args.imports)
    else:
        pipe, description = load_pipeline(args.pipeline)
        pipe.set_progress_bar_config(disable=True)
        reference, against = (None, "") if args.reference is None else load_pipeline(args.reference)
        if reference is not None:
            reference.set_progress_bar_config(disable=True)
        records = Evaluation(pipe, settings, reference=reference).run()
    title = f"sparse-dit evaluation: {description}" + (f", scored against {against}'s dense output" if against else "")
    md, page = write_reports(records, settings.out, title)
    print(markdown(records, title))
    print(f"wrote {settings.out / 'results.json'}, {md}, {page}")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from ..evals.locality_report import write_locality_report

    if len(args.window) != 3 or min(args.window) < 1:
        raise ConfigError(f"--window takes three positive token counts, frames,rows,columns (e.g. 3,5,5), "
                          f"got {','.join(map(str, args.window))}")
    pipe, description = load_pipeline(args.pipeline)
    call = video_call(args, prompt=args.prompt, generator=torch.Generator().manual_seed(args.seed), output_type="pt")
    steps = args.sample_steps or [args.steps // 2]
    write_locality_report(pipe, Path(args.out), call, steps=steps, window=tuple(args.window), rows=args.rows,
                          heads=args.maps, compare_untrained=not args.no_untrained, seed=args.seed)
    print(f"{description}: attention mass inside a {'x'.join(map(str, args.window))} token window, steps {steps}")
    print((Path(args.out) / "locality.md").read_text())
    print(f"wrote {Path(args.out) / 'locality.json'}, {Path(args.out) / 'attention_maps.png'}")
    return 0


def cmd_concentration(args: argparse.Namespace) -> int:
    from ..patterns import resolve_config
    from ..search import measure_concentration

    prompts = read_prompts(args)
    pipe, description = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    call = video_call(args, output_type="pt")
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


def add_commands(sub: argparse._SubParsersAction) -> None:
    ev = add_command(sub, "eval", help="score methods against dense on the same prompts and seeds; writes a report",
                     example="sparse-dit eval --pipeline demo --methods dense,window --config window.window=[3,5,5] "
                             "--seeds 2 --out outputs/eval")
    add_pipeline(ev)
    ev.add_argument("--reference", default=None,
                    help="score every video against this pipeline's dense output and run the controls on it (e.g. "
                         "the original of a model `sparse-dit distill` wrote); default: the evaluated pipeline itself")
    ev.add_argument("--methods", type=csv(str), default=["dense", "window", "random"],
                    help="comma-separated; dense is the baseline and every method is paired with the --controls")
    ev.add_argument("--controls", type=csv(str), default=["random", "oracle"],
                    help="yardsticks run at each method's measured density: random (what it must beat), oracle "
                         "(the blocks of highest exact mass; costs full attention); comma-separated, '' for none")
    ev.add_argument("--config", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="a method option (JSON value), repeatable (default: each method's own options)")
    add_prompts(ev)
    add_video(ev, steps=10)
    ev.add_argument("--reps", type=int, default=1, help="timed repetitions per video (median)")
    ev.add_argument("--warmup", type=int, default=1, help="untimed generations per method before timing")
    ev.add_argument("--num-processes", type=int, default=1,
                    help="split the (method, prompt, seed) items over this many processes on this machine, one per "
                         "GPU (with accelerate); results.json is what one process writes. torchrun / accelerate "
                         "launch of the command work too")
    ev.add_argument("--out", required=True, help="output folder; rerunning skips finished items")
    ev.set_defaults(func=cmd_eval)

    att = add_command(sub, "attention", help="how local a pipeline's attention is, against its untrained twin; "
                                             "draws maps",
                      example="sparse-dit attention --pipeline demo --window 3,5,5 --out outputs/attention")
    add_pipeline(att)
    att.add_argument("--prompt", default="a red circle moving right", help="the prompt generated")
    att.add_argument("--seed", type=int, default=0, help="the generator seed")
    add_video(att, steps=20)
    att.add_argument("--sample-steps", type=csv(int), default=None, help="steps to sample (default: the middle one)")
    att.add_argument("--window", type=csv(int), default=[3, 5, 5], help="frames,rows,columns in tokens")
    att.add_argument("--rows", type=int, default=64, help="query rows sampled per call")
    att.add_argument("--maps", type=int, default=4, help="heads to draw")
    att.add_argument("--no-untrained", action="store_true", help="skip the re-initialised twin")
    att.add_argument("--out", default="outputs/attention", help="output folder")
    att.set_defaults(func=cmd_attention)

    conc = add_command(sub, "concentration", help="mass held by each query block's top key blocks (exact), per layer "
                                                  "and head; draws block-mass maps",
                       example="sparse-dit concentration --pipeline demo --seeds 2 --out outputs/concentration")
    add_pipeline(conc)
    add_prompts(conc)
    add_video(conc, steps=20)
    conc.add_argument("--dense-steps", type=float, default=0.2,
                      help="leading share of steps left out, as a sparse method's dense warm-up leaves them")
    conc.add_argument("--fraction", type=float, default=0.2, help="share of the key blocks counted")
    conc.add_argument("--block-size", type=int, default=64, help="block size in tokens")
    conc.add_argument("--out", default="outputs/concentration", help="output folder")
    conc.set_defaults(func=cmd_concentration)
