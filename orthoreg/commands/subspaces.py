"""``orthoreg subspaces extract|show``: record the reader term's input subspaces V_m of a model, or inspect them.

``extract`` records the template-reader constraint's subspaces (what ``OrthoRegConfig.recommended()`` records by
itself when training starts): per linear module after the first decoder layer, the top-k principal directions of the
module's inputs at the chat template's assistant-turn positions (post-instruction tokens and the model's first reply
token), over the built-in harmless requests or your own prompts. Run it on the *base* model you will fine-tune; pass
the folder to training as ``OrthoRegConfig(input_subspaces=DIR)`` or ``orthoreg sft --orthoreg_input_subspaces DIR``.
``--out`` ending in ``.safetensors`` writes one file; any other path the folder form (``save_pretrained``).

Examples:
    orthoreg subspaces extract --model ./my-model --out reader-subspaces/
    orthoreg subspaces extract --model org/model --out v/ --prompts my_prompts.txt --k 8 --targets q_proj,v_proj
    orthoreg subspaces show reader-subspaces/      # a folder, a .safetensors file or a Hub repo id
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import EXIT_OK, add_model_flags, fail, load_model, user_errors
from .directions import check_output, is_single_file


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``subspaces`` (with ``extract`` and ``show``) to an argparse subparsers object."""
    parser = subparsers.add_parser("subspaces", help="record or inspect the reader term's input subspaces",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="subspaces_command", required=True)
    extract = actions.add_parser("extract", help="record input subspaces V_m at the chat template's positions")
    extract.add_argument("--model", required=True, help="model directory (safetensors) or hub name")
    extract.add_argument("--out", required=True,
                         help="output: a .safetensors file, or a folder (save_pretrained form) for any other path")
    extract.add_argument("--prompts", default="builtin",
                         help="'builtin' (orthoreg's 200 built-in harmless requests), or a file of user messages "
                              "(.txt one per line, or JSONL/JSON/CSV/Parquet with a prompt column)")
    extract.add_argument("--k", type=int, default=16, help="directions per module")
    extract.add_argument("--targets", default=None,
                         help="comma-separated module name suffixes (e.g. q_proj,v_proj,down_proj); default: every "
                              "linear module after the first decoder layer")
    add_model_flags(extract)
    show = actions.add_parser("show", help="print the metadata and modules of saved input subspaces")
    show.add_argument("folder", help="a save_pretrained folder, a .safetensors file or a Hub repo id")
    show.add_argument("--revision", default=None, help="branch, tag or commit when FOLDER is a Hub repo id")
    parser.set_defaults(func=run)
    return parser


def _prompts(source: str) -> tuple[list[str], str]:
    from ..core.prompts import load_builtin, load_prompt_list

    if source == "builtin":
        return list(load_builtin("train").harmless), "orthoreg builtin harmless (train)"
    return list(load_prompt_list(source)), source


def _extract(args: argparse.Namespace) -> int:
    from ..reader.template import extract_template_subspaces

    check_output(args.out)
    prompts, prompt_set = _prompts(args.prompts)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, quiet=args.quiet,
                                  revision=args.revision, trust_remote_code=args.trust_remote_code)
    subspaces = extract_template_subspaces(model, tokenizer, prompts, k=args.k, targets=targets,
                                           batch_size=args.batch_size, prompt_set=prompt_set)
    subspaces.metadata["source_model"] = args.model
    if is_single_file(args.out):
        subspaces.save(args.out)
    else:
        subspaces.save_pretrained(args.out)
    print(summary(subspaces))
    print(f"wrote {args.out}")
    return EXIT_OK


def summary(subspaces: Any) -> str:
    """Provenance lines and one row per module: k, d_in and the share of the prompts' input energy V_m holds."""
    meta = subspaces.metadata
    prompt_set = meta.get("prompt_set") or {}
    lines = [f"source_model: {meta.get('source_model')}", f"method: {meta.get('method')}",
             f"positions: {meta.get('positions')}", f"prompts: {prompt_set.get('name')} ({prompt_set.get('count')})",
             f"modules: {len(subspaces)}, k: {subspaces.k}", f"{'module':<48}  {'k':>3}  {'d_in':>6}  {'energy':>7}"]
    energy = meta.get("energy") or {}
    for name, v in subspaces.items():
        share = energy.get(name)
        lines.append(f"{name:<48}  {v.shape[0]:>3}  {v.shape[1]:>6}  "
                     f"{format(share, '7.3f') if isinstance(share, float) else '-':>7}")
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> int:
    from ..reader.subspaces import InputSubspaces

    print(summary(InputSubspaces.from_pretrained(args.folder, revision=args.revision)))
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Runs ``subspaces extract`` or ``subspaces show``; returns the exit status (2 on a user error)."""
    try:
        return _extract(args) if args.subspaces_command == "extract" else _show(args)
    except user_errors() as err:
        return fail(err)


def main(argv: list[str] | None = None) -> int:
    """``python -m orthoreg.commands.subspaces extract …`` (the same as ``orthoreg subspaces extract …``)."""
    parser = argparse.ArgumentParser(prog="orthoreg")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["subspaces", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
