"""Assemble the benchmark table from recipe runs (``results.json`` files written by ``orthoreg.train``).

    python scripts/assemble_table.py outputs/                     # every results.json under outputs/, markdown
    python scripts/assemble_table.py outputs/ --out table.md      # also write it to a file
    python scripts/assemble_table.py outputs/ --json table.json   # the rows as JSON too

Rows follow ``recipes/table.yaml`` (the reported benchmark: model, task, reported rise and overlap); a benchmark
row without runs is listed as "not run", and runs of other models/tasks (e.g. the tiny toy model) follow. Stand-in
models are named as stand-ins. "Rise (pp)" is after − before of the harmful-output rate in percentage points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    from orthoreg.recipes_lib.results import assemble, find_results, load_reported

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="results.json files or folders to search recursively")
    parser.add_argument("--reported", default=str(REPO / "recipes" / "table.yaml"),
                        help="the reported benchmark rows (default: recipes/table.yaml); 'none' to leave them out")
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--json", dest="json_out", help="write the rows (model, task, reg, numbers, path) as JSON")
    args = parser.parse_args(argv)

    results = find_results(args.paths)
    reported = [] if args.reported == "none" else load_reported(args.reported)
    table = assemble(results, reported)
    sys.stdout.write(table)
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
    if args.json_out:
        rows = [{**r["row"], "harmful_rate": r["harmful_rate"], "overlap": (r.get("overlap") or {}).get("score"),
                 "device": r["run"]["device"], "path": r["_path"]} for r in results]
        Path(args.json_out).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(f"\n{len(results)} run(s) assembled", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
