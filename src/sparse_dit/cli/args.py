"""Argument groups and parsers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable


def given(**options: Any) -> dict[str, Any]:
    """The options set on the command line (not None); the callee's own defaults apply to the rest."""
    return {k: v for k, v in options.items() if v is not None}


def csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """An argparse type: comma-separated values of `kind`."""
    return lambda text: [kind(x) for x in text.split(",") if x]


def add_pipeline(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="demo",
                        help="demo, demo:diffuse, a folder `train-demo` wrote, or a local diffusers pipeline folder / "
                             "cached hub id (never downloaded) (default: demo)")


def add_prompts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", default=None,
                        help="a text file with one prompt per line (default: the evaluation's three demo prompts)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per prompt (default: 1)")


def add_video(parser: argparse.ArgumentParser, *, steps: int, frames: int | None = None, height: int | None = None,
              width: int | None = None) -> None:
    """--steps, --num-frames, --height, --width and --guidance-scale of the pipeline call."""
    parser.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default: {steps})")
    for flag, default in (("--num-frames", frames), ("--height", height), ("--width", width)):
        parser.add_argument(flag, type=int, default=default,
                            help=f"default: {default if default is not None else 'the pipeline' + chr(39) + 's own'}")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's own")


def video_call(args: argparse.Namespace, **call: Any) -> dict[str, Any]:
    """The pipeline-call arguments of `add_video`'s flags, where given, on top of `call`."""
    sizes = given(num_frames=args.num_frames, height=args.height, width=args.width, guidance_scale=args.guidance_scale)
    return {"num_inference_steps": args.steps, **call, **sizes}


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompts (one per line), or the evaluation's three."""
    from ..evals.runner import DEFAULT_PROMPTS

    if not args.prompts:
        return list(DEFAULT_PROMPTS)
    return [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]


def parse_configs(items: list[str]) -> dict[str, dict]:
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
