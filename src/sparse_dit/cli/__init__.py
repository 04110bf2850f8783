"""The `sparse-dit` command. Each module adds its subcommands (`add_commands`); shared flags live in `args`."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from . import bench, evaluate, methods


def build_parser() -> argparse.ArgumentParser:
    from ..demo import cli as demo  # the demo model's own commands

    parser = argparse.ArgumentParser(prog="sparse-dit", description="Sparse attention for diffusers DiT pipelines.")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module (a dotted name or a .py file) before the command, so that the methods "
                             "it registers with sparse_dit.register_method can be named; repeatable")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (demo, bench, evaluate, methods):
        module.add_commands(sub)
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


__all__ = ["build_parser", "main"]
