"""Argument groups and parsers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's example lines as written, and appends each option's default to its help.

    Unlike `argparse.ArgumentDefaultsHelpFormatter` it leaves help that already says what the default is alone,
    never prints "default: None" (an option defaulting to None must say in words what happens), writes lists
    as they are typed (comma-separated) and says "required" for required options.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        if action.required:
            return f"{text} (required)".strip()
        if action.default is None:
            return text  # the help says in words what None means; tests/test_cli.py checks that it does
        return f"{text} (default: {describe_default(action.default)})".strip()


def describe_default(value: Any) -> str:
    """A default as a user would type it: lists comma-separated, a store_true flag's False as "off"."""
    if isinstance(value, (list, tuple)):
        text = ",".join(map(str, value)) or "none"
    elif isinstance(value, bool):
        text = "on" if value else "off"
    else:
        text = str(value)
    return text.replace("%", "%%")  # argparse %-formats help strings


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), pointing at --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def add_command(sub: argparse._SubParsersAction, name: str, *, help: str, example: str) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatter and an epilog showing `example`, a realistic invocation."""
    return sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}", formatter_class=HelpFormatter)


def given(**options: Any) -> dict[str, Any]:
    """The options set on the command line (not None); the callee's own defaults apply to the rest."""
    return {k: v for k, v in options.items() if v is not None}


def csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """An argparse type: comma-separated values of `kind`; a bad value reads as a usage error naming it."""

    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


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
    for flag, what, default in (("--num-frames", "frames per clip", frames), ("--height", "clip height in pixels", height),
                                ("--width", "clip width in pixels", width)):
        said = default if default is not None else "the pipeline's own"
        parser.add_argument(flag, type=int, default=default, help=f"{what} (default: {said})")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance scale (default: the pipeline's own)")


def video_call(args: argparse.Namespace, **call: Any) -> dict[str, Any]:
    """The pipeline-call arguments of `add_video`'s flags, where given, on top of `call`."""
    sizes = given(num_frames=args.num_frames, height=args.height, width=args.width, guidance_scale=args.guidance_scale)
    return {"num_inference_steps": args.steps, **call, **sizes}


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompts (one per line), or the evaluation's three."""
    from ..evals.runner import DEFAULT_PROMPTS

    if not args.prompts:
        return list(DEFAULT_PROMPTS)
    path = Path(args.prompts)
    if not path.is_file():
        raise ConfigError(f"--prompts {args.prompts}: no such file; give a text file with one prompt per line")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def parse_configs(items: list[str]) -> dict[str, dict]:
    """METHOD.KEY=VALUE strings -> {method: {key: value}}; values are JSON where they parse, else strings."""
    configs: dict[str, dict] = {}
    for item in items:
        target, sep, raw = item.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not method or not key:
            raise ConfigError(f"--config expects METHOD.KEY=VALUE (e.g. window.window=[3,5,5]), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare word such as backend=gather
        configs.setdefault(method, {})[key] = tuple(value) if isinstance(value, list) else value
    return configs


def parse_options(text: str | None, flag: str = "--options") -> dict[str, Any]:
    """A JSON object of method options, e.g. '{"window": [3, 7, 7]}'; None gives {}."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag} is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}; "
                          """expected an object such as '{"window": [3, 7, 7]}'""") from None
    if not isinstance(options, dict):
        raise ConfigError(f"{flag} must be a JSON object of option names and values, got {text!r}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
