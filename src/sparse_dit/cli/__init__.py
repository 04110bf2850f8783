"""The `sparse-dit` command. Each module adds its subcommands (`add_commands`); shared flags live in `args`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from .. import __version__
from ..errors import ConfigError, SparseDiTError
from . import bench, evaluate, methods
from .args import HelpFormatter, Parser


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: global flags, then one subparser per command."""
    from ..demo import cli as demo  # the demo model's own commands

    parser = Parser(prog="sparse-dit", description="Sparse attention for diffusers DiT pipelines.",
                    epilog="example:\n  sparse-dit demo --method window --options '{\"window\": [3, 7, 7]}'",
                    formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"sparse-dit {__version__}")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module (a dotted name or a .py file) before the command, so that the methods "
                             "it registers with sparse_dit.register_method can be named; repeatable")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, bench, evaluate, methods):
        module.add_commands(sub)
    return parser


def import_user_module(name: str) -> None:
    """Import a dotted module name, or run a .py file as a module, for the methods it registers."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--import {name}: no such file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only the module asked for (or a package above it) being absent is the user's error; a missing
        # import inside that module is a bug in it and keeps its traceback.
        if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
            raise
        raise ConfigError(f"--import {name}: no module named {exc.name!r}; give a dotted module name on "
                          "sys.path or a path to a .py file") from None


def one_line(message: str) -> str:
    """A message on one line, as the command's error report must be."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def run(argv: list[str] | None = None) -> int:
    """Run the command and return its exit code; expected errors raise (`SparseDiTError`), for callers that want them."""
    args = build_parser().parse_args(argv)
    for name in args.imports:
        import_user_module(name)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    """The `sparse-dit` entry point: `run`, with an expected error (a `SparseDiTError`) printed as one line to stderr
    and exit code 2.

    Usage errors (an unknown flag, a value of the wrong type) exit 2 from argparse, also with one line. Anything
    else is a bug and keeps its traceback.
    """
    try:
        return run(argv)
    except SparseDiTError as exc:
        print(f"sparse-dit: error: {one_line(str(exc))}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main", "run"]
