"""The ``orthoreg`` command: ``demo``, ``directions``, ``audit``; each subcommand lives in ``orthoreg.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("demo", "directions", "audit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orthoreg",
        description="Geometric regularisers that keep benign fine-tuning from unlocking harmful behaviour.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"orthoreg.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(f"orthoreg.commands.{args.command}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
