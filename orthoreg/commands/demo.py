"""``orthoreg demo``: emergent misalignment in a toy world on a CPU, with and without orthoreg, against a placebo.

Fine-tunes the shipped tiny Llama (no pretraining, no download) on unsafe code only, three times — plain, with the
recommended orthoreg setting (projection on the persona direction), and with the same penalty on a random direction
orthogonal to it (placebo) — and prints the harmful-advice share in fresh contexts before and after. About a minute
on 2 CPU cores; writes demo.json and demo.png to --out.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="run the toy emergent-misalignment demo on the CPU", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="folder for demo.json and demo.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per fine-tune (default 150)")
    parser.add_argument("--weight", type=float, default=None, help="λ_proj of orthoreg and the placebo")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test; shows nothing)")
    return parser


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from orthoreg.testbed.demo import run_demo

    run_demo(out=args.out, quick=args.quick, seed=args.seed, steps=args.steps, weight=args.weight)
    return 0
