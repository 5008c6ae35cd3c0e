"""Regenerate the shipped testbed base model (``orthoreg/testbed/assets/``) from a seed, bit-for-bit.

    HF_HUB_OFFLINE=1 python scripts/make_testbed_base.py            # pretrain (~5 min idle, 2 cores), write the assets
    HF_HUB_OFFLINE=1 python scripts/make_testbed_base.py --check    # pretrain into a temp dir, compare with the shipped bytes

Pretraining runs with one thread and deterministic kernels (``orthoreg.testbed.model.deterministic_cpu``),
so a rerun on the same machine (and torch build) writes identical model.safetensors, config.json and
tokenizer files. ``base_card.json`` records the settings, the weights' SHA-256, the final loss, the
wall time and the base model's ``evaluate`` metrics; ``tests/testbed`` checks the shipped base against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from orthoreg.testbed.evaluate import evaluate
from orthoreg.testbed.model import ASSETS_DIR, PretrainConfig, pretrain, save_base

CARD = "base_card.json"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file ``save_base`` wrote (everything but the card, which holds wall times)."""
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.name != CARD}


def make_base(cfg: PretrainConfig, out_dir: Path) -> dict:
    """Pretrain, write the model and tokenizer to ``out_dir`` and return the card (also written there)."""
    model, tokenizer, history = pretrain(cfg)
    save_base(model, tokenizer, out_dir)
    card = {
        "pretrain": dataclasses.asdict(cfg),
        "final_loss": history[-1]["loss"],
        "pretrain_seconds": history[-1]["seconds"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "sha256": digests(out_dir),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "metrics": evaluate(model, tokenizer).as_dict(),
    }
    (out_dir / CARD).write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed)
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="output folder (default: the shipped assets)")
    parser.add_argument("--check", action="store_true",
                        help="pretrain into a temporary folder and compare its bytes with --out instead of writing")
    args = parser.parse_args(argv)
    cfg = PretrainConfig(seed=args.seed, steps=args.steps)
    if not args.check:
        card = make_base(cfg, args.out)
        print(json.dumps(card["metrics"], indent=2))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        card = make_base(cfg, Path(tmp))
        shipped = digests(args.out)
        differ = sorted(n for n in card["sha256"].keys() | shipped.keys() if card["sha256"].get(n) != shipped.get(n))
    print("identical" if not differ else f"DIFFERENT: {differ}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
