"""``orthoreg sft``: TRL's SFT script with orthoreg's ``--orthoreg_*`` flags (the script is ``orthoreg.sft``).

Its command line is TRL's (``TrlParser``), not argparse subcommand options: ``orthoreg.cli`` hands everything after
``sft`` to :func:`orthoreg.sft.run` unparsed. The subparser registered here only lists the command in
``orthoreg --help``.
"""

from __future__ import annotations

import argparse
from typing import Any

HELP = "supervised fine-tuning with orthoreg: TRL's SFT script and its flags, plus --orthoreg_* (see `orthoreg sft -h`)"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    return subparsers.add_parser("sft", help=HELP, add_help=False)


def run_argv(argv: list[str]) -> int:
    from orthoreg.sft import run

    return run(argv, prog="orthoreg sft")
