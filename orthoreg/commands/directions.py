"""``orthoreg directions extract|show``: extract harmful directions from contrast prompts, or inspect them.

``--out`` ending in ``.safetensors`` writes one file (``HarmfulDirections.save``); any other path writes the folder
form (``save_pretrained``: directions.safetensors + directions_config.json), which ``from_pretrained`` and
``push_to_hub`` take. Output paths are checked before the model is loaded.

Examples:
    orthoreg directions extract --model ./my-model --out harmful-directions/ --layers middle_third
    orthoreg directions extract --model org/model --revision v1.0 --out h.safetensors --prompts pairs.jsonl --k 3
    orthoreg directions extract --model ./my-model --out h.safetensors \\
        --harmful-file harmful.txt --harmless-file harmless.txt --pooling mean
    orthoreg directions show harmful-directions/      # a folder, a .safetensors file or a Hub repo id
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._common import EXIT_OK, add_model_flags, check_output_dir, fail, load_model, parse_layers, user_errors


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds ``directions`` (with ``extract`` and ``show``) to an argparse subparsers object."""
    parser = subparsers.add_parser("directions", help="extract or inspect harmful directions",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="directions_command", required=True)

    extract = actions.add_parser("extract", help="extract harmful directions from contrast prompts")
    extract.add_argument("--model", required=True, help="model directory (safetensors) or hub name")
    extract.add_argument("--out", required=True,
                         help="output: a .safetensors file, or a folder (save_pretrained form) for any other path")
    source = extract.add_argument_group("prompts (default: the built-in set, train split; test split held out)")
    source.add_argument("--prompts", default="builtin",
                        help="'builtin', a JSONL/JSON/CSV file with harmful/harmless (or prompt+label) columns, or "
                             "a `datasets` name")
    source.add_argument("--split", default="train", help="split of --prompts to extract from")
    source.add_argument("--harmful-file",
                        help="harmful prompts (.txt one per line, or JSONL/JSON/CSV/Parquet with a prompt column)")
    source.add_argument("--harmless-file", help="harmless prompts, same formats (needs --harmful-file)")
    source.add_argument("--balance", choices=("error", "truncate"), default="error",
                        help="unbalanced sets: refuse, or keep the first min(n) of each")
    options = extract.add_argument_group("extraction")
    options.add_argument("--layers", default="all", help="'all', 'middle_third', '2/3:', or indices '4,8,-1'")
    options.add_argument("--k", type=int, default=1, help="directions per layer")
    options.add_argument("--method", choices=("diff_means", "pca_diff", "class_means"), default=None,
                         help="default: diff_means for k=1; pca_diff (paired sets) or class_means for k>1")
    options.add_argument("--pooling", choices=("last", "mean"), default="last",
                         help="last prompt token, or mean over the prompt's tokens")
    options.add_argument("--heldout", type=float, default=0.2,
                         help="fraction held out for separation statistics (built-in set: its test split)")
    options.add_argument("--no-chat-template", action="store_true", help="use raw prompts even if a template exists")
    options.add_argument("--truncate", action="store_true", help="keep the last --max-length tokens of long prompts")
    options.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    add_model_flags(extract)

    show = actions.add_parser("show", help="print the metadata and separation table of harmful directions")
    show.add_argument("file", help="a .safetensors directions file, a save_pretrained folder or a Hub repo id")
    show.add_argument("--revision", default=None, help="branch, tag or commit when FILE is a Hub repo id")
    parser.set_defaults(func=run)
    return parser


def separation_table(directions: Any) -> str:
    """The per-layer separation statistics of extracted directions as a fixed-width table."""
    separation = directions.metadata.get("separation") or {}
    split = directions.metadata.get("separation_split", "heldout")
    rows = [f"{'layer':>5}  {'d_prime':>8}  {'acc(' + split + ')':>14}  {'|gap|':>9}  {'explained':>9}"]
    for layer in directions.layers:
        stats = separation.get(str(layer), {})

        def fmt(key: str, spec: str, stats: dict = stats) -> str:
            value = stats.get(key)
            return format(value, spec) if isinstance(value, (int, float)) else "-"

        rows.append(f"{layer:>5}  {fmt('d_prime', '8.2f'):>8}  {fmt('accuracy', '14.3f'):>14}  "
                    f"{fmt('gap_norm', '9.3g'):>9}  {fmt('explained', '9.3f'):>9}")
    return "\n".join(rows)


def _contrast(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..core.prompts import ContrastSet, load_builtin, load_contrast, load_prompt_list

    if args.harmful_file or args.harmless_file:
        if not (args.harmful_file and args.harmless_file):
            raise FileNotFoundError("--harmful-file and --harmless-file go together; give both")
        harmful, harmless = load_prompt_list(args.harmful_file), load_prompt_list(args.harmless_file)
        return ContrastSet(harmful, harmless, source=f"{args.harmful_file} / {args.harmless_file}"), args.heldout
    if args.prompts == "builtin":
        return load_builtin(args.split), load_builtin("test") if args.split == "train" else args.heldout
    return load_contrast(args.prompts, split=args.split), args.heldout


def is_single_file(out: str) -> bool:
    """``--out x.safetensors`` is the single-file form; any other path is a ``save_pretrained`` folder."""
    return out.endswith(".safetensors")


def check_output(out: str) -> None:
    """Refuses an unwritable ``--out`` before any prompt is read or model loaded."""
    from ..core.bases import check_output_file

    if is_single_file(out):
        check_output_file(out)
    else:
        check_output_dir(out, "--out folder")


def _extract(args: argparse.Namespace) -> int:
    import warnings

    from ..core.prompt_encoding import UNKNOWN_TOKEN_WARN_SHARE
    from ..directions.extraction import UnknownTokenWarning, extract_directions, unknown_token_share

    check_output(args.out)
    contrast, heldout = _contrast(args)
    method = args.method or ("diff_means" if args.k == 1 else "pca_diff" if contrast.paired else "class_means")
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, quiet=args.quiet,
                                  revision=args.revision, trust_remote_code=args.trust_remote_code)
    coverage = unknown_token_share(tokenizer, contrast.harmful + contrast.harmless)
    if coverage.unknown_share > UNKNOWN_TOKEN_WARN_SHARE:
        print(f"warning: {coverage.message(contrast.source)}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownTokenWarning)  # printed above, once, as a CLI line
        directions = extract_directions(
            model, tokenizer, contrast, layers=parse_layers(args.layers), k=args.k, method=method,
            pooling=args.pooling, batch_size=args.batch_size, max_length=args.max_length, progress=not args.quiet,
            heldout=heldout, chat_template=False if args.no_chat_template else None, truncate=args.truncate,
            balance=args.balance, seed=args.seed, source_model=args.model,
            # The resolved commit when the model came from the Hub, else the revision asked for.
            source_revision=getattr(model.config, "_commit_hash", None) or args.revision,
        )
    if is_single_file(args.out):
        directions.save(args.out)
    else:
        directions.save_pretrained(args.out)
    meta = directions.metadata
    print(f"harmful directions: {len(directions.layers)} layer(s), k={directions.k}, method={meta['method']}, "
          f"pooling={meta['pooling']}, {meta['n_harmful']} harmful / {meta['n_harmless']} harmless prompts "
          f"({contrast.source}), chat template: {'yes' if meta['chat_template'] else 'no'}")
    print(separation_table(directions))
    print(f"wrote {args.out}")
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    from ..directions.harmful import HarmfulDirections

    directions = HarmfulDirections.from_pretrained(args.file, revision=args.revision)
    meta = directions.metadata
    for key in ("source_model", "source_revision", "model_type", "num_layers", "method", "pooling", "prompt_hash"):
        print(f"{key}: {meta.get(key)}")
    print(f"hidden_size: {directions.hidden_size}\nk: {directions.k}\nlayers: {directions.layers}")
    print(separation_table(directions))
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Runs ``directions extract`` or ``directions show``; returns the exit status (2 on a user error)."""
    try:
        return _extract(args) if args.directions_command == "extract" else _show(args)
    except user_errors() as err:
        return fail(err)


def main(argv: list[str] | None = None) -> int:
    """``python -m orthoreg.commands.directions extract …`` (the same as ``orthoreg directions extract …``)."""
    parser = argparse.ArgumentParser(prog="orthoreg")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["directions", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
