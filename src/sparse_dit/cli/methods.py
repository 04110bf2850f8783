"""`sparse-dit methods`: the registered methods and their options."""

from __future__ import annotations

import argparse

from .args import add_command


def cmd_methods(args: argparse.Namespace) -> int:
    from ..patterns import registered_methods

    for name, cls in registered_methods().items():
        print(f"{name:10s} {cls.description}")
        print(f"{'':10s} options: {', '.join(cls.config_cls.option_names())}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    add_command(sub, "methods", help="list the registered sparse attention methods and their options",
                example="sparse-dit --import my_methods.py methods").set_defaults(func=cmd_methods)
