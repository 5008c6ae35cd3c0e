"""The ``orthoreg`` command: ``demo``, ``directions``, ``subspaces``, ``audit``, ``sft``; each subcommand lives in ``orthoreg.commands``.

``sft`` takes TRL's command line (``TrlParser``), so everything after ``orthoreg sft`` goes to ``orthoreg.sft``
unparsed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("demo", "directions", "subspaces", "audit", "sft")
PASSTHROUGH = ("sft",)  # subcommands that parse their own command line


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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return int(importlib.import_module(f"orthoreg.commands.{argv[0]}").run_argv(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(f"orthoreg.commands.{args.command}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
