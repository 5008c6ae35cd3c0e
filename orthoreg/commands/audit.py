"""``orthoreg audit``: the geometric overlap of a fine-tuning task with a model's harmful directions.

Before training (default) the task's feature direction is its mean negative loss gradient at each layer; with
``--finetuned`` it is the mean activation shift of the fine-tuned model from the base. Prints a per-layer table, the
superposition density of the base model on the task data, a recommended configuration (guarded layers, drift budget,
anchor) as ready-to-paste code, and the verdict line (last); writes ``overlap.json`` (with ``density`` and
``recommendation``) and ``overlap.png`` to ``--out``.

``--directions`` takes a ``.safetensors`` file, a ``save_pretrained`` folder or a Hub repo id; ``--data`` a
JSON/JSONL/CSV/Parquet/.txt file or a Hub dataset name (read with ``datasets``). The output folder is checked
before any model is loaded.

Examples:
    orthoreg audit --model ./base --data task.jsonl --directions harmful.safetensors --out audit/
    orthoreg audit --model ./base --finetuned ./tuned --data task.jsonl --directions harmful.safetensors
    orthoreg audit ... --fail-on elevated     # exit status 1 when the verdict is elevated or high (for CI)
    orthoreg audit ... --lora                 # recommend the paired anchor (LoRA fine-tuning)
    orthoreg audit ... --no-recommend         # overlap only: no density pass, no recommendation
    orthoreg audit ... --probe-steps 10       # + a 10-step LoRA dry run: the erosion its harm signal predicts
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

from ._common import (
    EXIT_FLAGGED,
    EXIT_OK,
    add_model_flags,
    check_output_dir,
    fail,
    load_model,
    parse_layers,
    user_errors,
)

OUTPUT_FILES = ("overlap.json", "overlap.png")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``audit`` to an argparse subparsers object."""
    parser = subparsers.add_parser("audit", help="overlap of a fine-tuning task with harmful directions",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base model directory (safetensors) or hub name")
    parser.add_argument("--data", required=True,
                        help="task data: JSONL/JSON/CSV/Parquet with text | prompt+completion | messages, .txt lines, "
                             "or a Hub dataset name")
    parser.add_argument("--data-split", default="train", help="split of a Hub dataset given as --data")
    parser.add_argument("--directions", required=True,
                        help="harmful directions of this model: .safetensors file, save_pretrained folder or Hub repo")
    parser.add_argument("--out", default="orthoreg-audit", help="directory for overlap.json and overlap.png")
    parser.add_argument("--finetuned", help="fine-tuned model: score the activation shift instead of the gradient")
    parser.add_argument("--finetuned-revision", default=None, help="branch, tag or commit of a Hub --finetuned model")
    parser.add_argument("--layers", default=None, help="layers to score (default: every layer with directions)")
    parser.add_argument("--guard-layers", default=None,
                        help="layers the penalty would guard, marked in the plot (default: OrthoRegConfig's default)")
    parser.add_argument("--max-examples", type=int, default=None, help="use only the first N examples")
    parser.add_argument("--mask", choices=("attention", "labels"), default="attention",
                        help="tokens averaged over: every non-padding token, or only labelled ones")
    parser.add_argument("--thresholds", type=float, nargs=2, default=(0.1, 0.3), metavar=("LOW", "HIGH"),
                        help="verdict thresholds: low < LOW <= elevated < HIGH <= high")
    parser.add_argument("--fail-on", choices=("elevated", "high"), default=None,
                        help="exit with status 1 when the verdict is at least this")
    parser.add_argument("--lora", action="store_true",
                        help="the fine-tune will be LoRA: recommend the paired anchor")
    parser.add_argument("--no-recommend", dest="recommend", action="store_false",
                        help="skip the density pass and the recommended configuration")
    parser.add_argument("--probe-steps", type=int, default=0, metavar="K",
                        help="also run a K-step LoRA dry run on the data (discarded) and report the erosion the live "
                             "harm signal predicts, with its measured error (orthoreg.audit.erosion_probe); needs a "
                             "chat template")
    parser.add_argument("--probe-lr", type=float, default=5e-4, help="learning rate of the dry run")
    parser.add_argument("--probe-batch-size", type=int, default=8, help="examples per step of the dry run")
    parser.add_argument("--probe-rank", type=int, default=16, help="LoRA rank of the dry run")
    add_model_flags(parser)
    parser.set_defaults(func=run)
    return parser


def _audit(args: argparse.Namespace) -> int:
    from ..audit import VERDICTS, load_task_examples, overlap_score, plot_overlap
    from ..directions.harmful import HarmfulDirections

    # Everything that can fail cheaply fails before any model is loaded: the output paths, the directions, the data.
    check_output_dir(args.out, "--out folder")
    for name in OUTPUT_FILES:
        if os.path.isdir(os.path.join(args.out, name)):
            raise IsADirectoryError(f"{os.path.join(args.out, name)!r} is a folder; the audit writes a file there. "
                                    "Remove it or choose another --out")
    if args.probe_steps < 0 or args.probe_batch_size < 1 or args.probe_rank < 1 or not args.probe_lr > 0:
        raise ValueError("--probe-steps must be >= 0 (0: no dry run), --probe-batch-size and --probe-rank >= 1, "
                         "--probe-lr > 0")
    directions = HarmfulDirections.from_pretrained(args.directions)
    examples = load_task_examples(args.data, limit=args.max_examples, split=args.data_split)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, quiet=args.quiet,
                                  revision=args.revision, trust_remote_code=args.trust_remote_code)
    finetuned = None
    if args.finetuned:
        finetuned, _ = load_model(args.finetuned, device=args.device, dtype=args.dtype, tokenizer=False,
                                  quiet=args.quiet, revision=args.finetuned_revision,
                                  trust_remote_code=args.trust_remote_code)
    report = overlap_score(
        model, directions, examples, tokenizer, finetuned=finetuned, layers=parse_layers(args.layers),
        guarded_layers=parse_layers(args.guard_layers), batch_size=args.batch_size, max_length=args.max_length,
        mask=args.mask, thresholds=tuple(args.thresholds), progress=not args.quiet,
    )
    report.info.update(model=args.model, finetuned=args.finetuned, data=args.data, directions=args.directions)

    extra = _recommendation(args, model, tokenizer, directions, examples, report) if args.recommend else {}
    if args.probe_steps:
        extra["erosion_probe"] = _erosion_probe(args, model, tokenizer, examples)

    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, OUTPUT_FILES[0])
    report.save_json(json_path)
    if extra:
        _add_to_json(json_path, {key: value.to_dict() for key, value in extra.items()})
    written = [json_path]
    try:
        written.append(plot_overlap(report, os.path.join(args.out, OUTPUT_FILES[1])))
    except ImportError as err:  # the score stands without the picture
        print(f"warning: no plot written: {err}", file=sys.stderr)

    what = "activation shift (fine-tuned − base)" if report.mode == "shift" else "task gradient −∂L/∂h"
    print(f"overlap of the {what} with the harmful directions; {report.n_examples} examples, {report.n_tokens} "
          f"tokens; * = guarded layer")
    print(report.table())
    if "density" in extra:
        print("superposition density of the base model on the task data (orthoreg.audit.density):")
        print(extra["density"].table())
        recommendation = extra["recommendation"]
        print("recommended configuration (orthoreg.audit.recommend; " + "; ".join(recommendation.reasons) + "):")
        print(recommendation.code(args.directions))
    if "erosion_probe" in extra:
        print("\n".join(extra["erosion_probe"].lines()))
    print(f"wrote {', '.join(written)}")
    print(report.verdict_line())
    if args.fail_on and VERDICTS.index(report.verdict) >= VERDICTS.index(args.fail_on):
        return EXIT_FLAGGED
    return EXIT_OK


def _recommendation(args, model, tokenizer, directions, examples, report) -> dict[str, Any]:
    """The density of the base model on the task data and the recommended configuration."""
    from ..audit import encode_task_examples, recommend, superposition_density, task_batches
    from ..core.activations import input_device
    from ..core.prompt_encoding import model_context_length, pad_token_id

    encoded = encode_task_examples(tokenizer, examples, max_length=args.max_length or model_context_length(model))
    batches = task_batches(encoded, args.batch_size, pad_token_id(tokenizer) if tokenizer is not None else 0,
                            input_device(model))
    batches = ({k: v for k, v in b.items() if k != "labels"} for b in batches) if args.mask == "attention" else batches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if args.quiet else "default")
        density = superposition_density(model, batches, layers=sorted(report.per_layer), directions=directions,
                                        mask=args.mask)
    return {"density": density, "recommendation": recommend(report, density, lora=args.lora)}


def _erosion_probe(args, model, tokenizer, examples):
    """The K-step LoRA dry run and the erosion its harm signal predicts (``orthoreg.audit.erosion_probe``)."""
    from ..audit import encode_task_examples, probe_erosion
    from ..core.prompt_encoding import model_context_length

    encoded = encode_task_examples(tokenizer, examples, max_length=args.max_length or model_context_length(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if args.quiet else "default")
        return probe_erosion(model, tokenizer, encoded, steps=args.probe_steps, lr=args.probe_lr,
                             batch_size=args.probe_batch_size, rank=args.probe_rank)


def _add_to_json(path: str, extra: dict[str, Any]) -> None:
    import json

    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    data.update(extra)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")


def run(args: argparse.Namespace) -> int:
    """Runs the audit; returns 0, 1 (verdict at or above ``--fail-on``) or 2 (a user error, printed)."""
    try:
        return _audit(args)
    except user_errors() as err:
        return fail(err)


def main(argv: list[str] | None = None) -> int:
    """``python -m orthoreg.commands.audit --model …`` (the same as ``orthoreg audit --model …``)."""
    parser = argparse.ArgumentParser(prog="orthoreg")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
