"""Contrast prompt sets: the built-in set, JSONL/JSON/CSV/Parquet/text files, ``datasets`` names, and validation.

A contrast set is two lists of prompts, ``harmful`` and ``harmless``, ideally paired (the i-th harmless prompt has
the form of the i-th harmful one, so their difference isolates harmfulness rather than wording). Every loader returns
a :class:`ContrastSet`; :func:`validate_contrast` is the single place that refuses empty or unbalanced sets.

Files and Hub datasets are read with ``datasets.load_dataset`` (``orthoreg.core.datafiles``). Accepted layouts
(``.jsonl``, ``.json`` — a list of objects —, ``.csv``, ``.parquet``, or a Hub dataset's columns):

- **paired**: columns ``harmful`` and ``harmless`` (either may be empty in a row); optional ``category``, ``split``.
- **labelled**: a text column (``prompt``, ``text``, ``instruction``, ``goal`` or ``question``) and a ``label``
  column whose values are ``harmful``/``harmless`` (also ``1``/``0``, ``true``/``false``, ``unsafe``/``safe``).
- **one list per file** (:func:`load_prompt_list`, for ``--harmful-file``/``--harmless-file``): ``.txt`` with one
  prompt per line, or a JSONL/JSON/CSV/Parquet file with one of the text columns above.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

TEXT_COLUMNS = ("prompt", "text", "instruction", "goal", "question", "request")
_HARMFUL_LABELS = {"harmful", "1", "true", "unsafe", "yes", "malicious", "bad"}
_HARMLESS_LABELS = {"harmless", "0", "false", "safe", "no", "benign", "good"}
SPLITS = ("train", "test", "all")
BUILTIN_NAME = "builtin"
# Above this ratio of set sizes a difference of means is dominated by the larger set's noise, and a paired method
# cannot run at all; below it, unequal sets are fine for unpaired methods.
DEFAULT_MAX_IMBALANCE = 1.25


class PromptSetError(ValueError):
    """A contrast prompt set is missing, empty, unbalanced or malformed."""


@dataclass
class ContrastSet:
    """Harmful and harmless prompts, optionally paired and labelled by harm category.

    Args:
        harmful (`list[str]`): harmful requests.
        harmless (`list[str]`): harmless requests; when ``paired``, ``harmless[i]`` matches ``harmful[i]``'s form.
        categories (`list[str]`, *optional*): harm category of each harmful prompt (enables ``class_means``).
        paired (`bool`, *optional*, defaults to `False`): whether ``harmful[i]`` and ``harmless[i]`` form a pair.
        source (`str`, *optional*): where the prompts came from, for messages and metadata.
    """

    harmful: list[str]
    harmless: list[str]
    categories: list[str] | None = None
    paired: bool = False
    source: str = "<memory>"
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.harmful) + len(self.harmless)

    def fingerprint(self) -> str:
        """sha256 of the prompts (and categories), in order; stored in directions metadata as ``prompt_hash``."""
        return prompt_hash(self.harmful, self.harmless, self.categories)


def prompt_hash(harmful: Sequence[str], harmless: Sequence[str], categories: Sequence[str] | None = None) -> str:
    """``"sha256:<hex>"`` of the JSON list ``[harmful, harmless, categories]`` (UTF-8, no whitespace)."""
    payload = json.dumps([list(harmful), list(harmless), list(categories) if categories else None],
                         ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def validate_contrast(
    harmful: Sequence[str],
    harmless: Sequence[str],
    *,
    paired: bool = False,
    balance: Literal["error", "truncate"] = "error",
    max_imbalance: float = DEFAULT_MAX_IMBALANCE,
    source: str = "the contrast set",
) -> tuple[list[str], list[str]]:
    """Checks a contrast set and returns it as two lists of stripped strings.

    Args:
        harmful, harmless: the prompts.
        paired: a paired method needs exactly equal counts (``harmful[i]`` pairs with ``harmless[i]``).
        balance: ``"error"`` refuses an unbalanced set; ``"truncate"`` (documented fallback) keeps the first
            ``min(len(harmful), len(harmless))`` prompts of each set, with a warning.
        max_imbalance: largest accepted ratio ``max(n_harmful, n_harmless) / min(...)`` when not ``paired``.

    Raises:
        PromptSetError: a set is empty, holds a non-string or blank prompt, or the sets are unbalanced.
    """
    if isinstance(harmful, str) or isinstance(harmless, str):
        raise PromptSetError(f"{source}: `harmful` and `harmless` must be lists of prompts, not a single string")
    cleaned = []
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        prompts = list(prompts)
        if not prompts:
            raise PromptSetError(
                f"{source}: the {name} prompt set is empty; give at least one {name} prompt per harmful one "
                "(or use the built-in set: `orthoreg.core.prompts.load_builtin()`)"
            )
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise PromptSetError(f"{source}: {name} prompt #{i} is {prompt!r}; every prompt must be non-empty text")
        cleaned.append([p.strip() for p in prompts])
    harmful, harmless = cleaned
    n_h, n_b = len(harmful), len(harmless)
    unbalanced = n_h != n_b if paired else max(n_h, n_b) / min(n_h, n_b) > max_imbalance
    if unbalanced:
        if balance == "truncate":
            n = min(n_h, n_b)
            warnings.warn(
                f"{source}: {n_h} harmful vs {n_b} harmless prompts; keeping the first {n} of each (balance='truncate')",
                stacklevel=2,
            )
            harmful, harmless = harmful[:n], harmless[:n]
        else:
            need = "equal counts (a paired method)" if paired else f"a size ratio of at most {max_imbalance}"
            raise PromptSetError(
                f"{source}: unbalanced contrast set ({n_h} harmful vs {n_b} harmless prompts); this needs {need}. "
                f"Add prompts to the smaller set, or pass balance='truncate' (CLI: --balance truncate) to keep the "
                f"first {min(n_h, n_b)} of each"
            )
    overlap = set(harmful) & set(harmless)
    if overlap:
        warnings.warn(
            f"{source}: {len(overlap)} prompt(s) appear in both sets (e.g. {sorted(overlap)[0]!r}); check the labels",
            stacklevel=2,
        )
    return harmful, harmless


# ----------------------------------------------------------------------------------------------- built-in set


def load_builtin(split: Literal["train", "test", "all"] = "train", categories: Iterable[str] | None = None) -> ContrastSet:
    """The project's built-in paired contrast set (``orthoreg/data/contrast_prompts.jsonl``).

    240 harmful requests over 10 harm categories, each paired with a harmless request of the same form; the
    ``test`` split (40 pairs) holds out whole activities, not rewordings of training ones.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        categories: keep only these harm categories (see :func:`builtin_categories`).
    """
    if split not in SPLITS:
        raise PromptSetError(f"unknown split {split!r}; use one of {SPLITS}")
    text = resources.files("orthoreg").joinpath("data/contrast_prompts.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    wanted = set(categories) if categories is not None else None
    if wanted is not None:
        unknown = wanted - {r["category"] for r in rows}
        if unknown:
            raise PromptSetError(f"unknown built-in categories {sorted(unknown)}; available: {builtin_categories()}")
    rows = [r for r in rows if (split == "all" or r["split"] == split) and (wanted is None or r["category"] in wanted)]
    return ContrastSet(
        harmful=[r["harmful"] for r in rows],
        harmless=[r["harmless"] for r in rows],
        categories=[r["category"] for r in rows],
        paired=True,
        source=f"{BUILTIN_NAME}:{split}",
    )


def builtin_categories() -> list[str]:
    """The harm categories of the built-in set."""
    return sorted(set(load_builtin("all").categories or []))


# ----------------------------------------------------------------------------------------------- files


def _text_column(columns: Iterable[str], source: str) -> str:
    columns = list(columns)
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    raise PromptSetError(f"{source}: no prompt column; expected one of {TEXT_COLUMNS} (found {sorted(columns)})")


def _label_side(value: Any, source: str, row: int) -> str:
    text = str(value).strip().lower()
    if text in _HARMFUL_LABELS:
        return "harmful"
    if text in _HARMLESS_LABELS:
        return "harmless"
    raise PromptSetError(
        f"{source}: row {row} has label {value!r}; use 'harmful'/'harmless' (or 1/0, true/false, unsafe/safe)"
    )


def contrast_from_records(
    records: Sequence[Mapping[str, Any]],
    *,
    source: str,
    split: str | None = None,
    harmful_column: str = "harmful",
    harmless_column: str = "harmless",
    text_column: str | None = None,
    label_column: str = "label",
) -> ContrastSet:
    """Builds a contrast set from row dicts (paired columns, or a text column plus a label column).

    Rows with a ``split`` field are filtered by ``split`` when given. A set is marked ``paired`` only when every row
    carries both a harmful and a harmless prompt.
    """
    if not records:
        raise PromptSetError(f"{source} holds no rows")
    if split is not None and split != "all" and any("split" in r for r in records):
        records = [r for r in records if r.get("split") == split]
        if not records:
            raise PromptSetError(f"{source} has no rows with split={split!r}")
    columns = set().union(*(r.keys() for r in records))
    harmful: list[str] = []
    harmless: list[str] = []
    categories: list[str] = []
    if harmful_column in columns or harmless_column in columns:
        paired = True
        for row in records:
            h, b = row.get(harmful_column), row.get(harmless_column)
            h = h if isinstance(h, str) and h.strip() else None
            b = b if isinstance(b, str) and b.strip() else None
            paired &= h is not None and b is not None
            if h is not None:
                harmful.append(h)
                categories.append(str(row.get("category") or "unspecified"))
            if b is not None:
                harmless.append(b)
    elif label_column in columns:
        paired = False
        column = text_column or _text_column(columns, source)
        for i, row in enumerate(records):
            text = row.get(column)
            if not isinstance(text, str) or not text.strip():
                continue
            if _label_side(row.get(label_column), source, i) == "harmful":
                harmful.append(text)
                categories.append(str(row.get("category") or "unspecified"))
            else:
                harmless.append(text)
    else:
        raise PromptSetError(
            f"{source}: expected columns `{harmful_column}`/`{harmless_column}` (paired) or a prompt column plus "
            f"`{label_column}`; found {sorted(columns)}"
        )
    has_categories = any(c != "unspecified" for c in categories)
    return ContrastSet(harmful, harmless, categories if has_categories else None, paired=paired, source=source)


def _read_prompt_file(path: str) -> list[dict[str, Any]]:
    from .datafiles import read_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no prompt file at {path!r}")
    return read_file(path, error=PromptSetError)


def load_contrast_file(path: str | os.PathLike, split: str | None = None, **columns: str) -> ContrastSet:
    """Loads a paired or labelled contrast set from a ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` file.

    Raises:
        FileNotFoundError: the file does not exist.
        PromptSetError: the file is malformed or has neither layout (see the module docstring).
    """
    path = os.fspath(path)
    return contrast_from_records(_read_prompt_file(path), source=path, split=split, **columns)


def load_prompt_list(path: str | os.PathLike, column: str | None = None) -> list[str]:
    """Loads one list of prompts: a ``.txt`` file (one prompt per line) or a JSONL/JSON/CSV/Parquet file with a
    text column (``column``, else the first of ``TEXT_COLUMNS`` present).

    Raises:
        FileNotFoundError: the file does not exist.
        PromptSetError: the file is malformed, empty, or has no text column.
    """
    path = os.fspath(path)
    records = _read_prompt_file(path)
    if not records:
        raise PromptSetError(f"{path} holds no prompts")
    name = column or _text_column(set().union(*(r.keys() for r in records)), path)
    prompts = [r.get(name) for r in records]
    return [p for p in prompts if isinstance(p, str) and p.strip()]


# ----------------------------------------------------------------------------------------------- datasets hub


def load_hub_contrast(name: str, split: str = "train", config: str | None = None, **columns: str) -> ContrastSet:
    """Loads a contrast set with ``datasets.load_dataset(name, config, split=split)``.

    The dataset needs the paired or the labelled layout (see the module docstring); column names can be overridden
    (``harmful_column=``, ``harmless_column=``, ``text_column=``, ``label_column=``).

    Raises:
        PromptSetError: the dataset cannot be fetched (offline, unknown name, no access) — the message points to
            the local-file options — or has neither layout.
    """
    from .datafiles import read_hub

    records = read_hub(
        name, split=split, config=config, error=PromptSetError,
        fix="Download it where the network allows and export it to a local file, then pass it as a file: a "
            "JSONL/CSV/Parquet with `harmful`/`harmless` columns (CLI: --prompts FILE) or one file per side "
            "(--harmful-file/--harmless-file); or use the built-in set (--prompts builtin)",
    )
    return contrast_from_records(records, source=f"{name}[{split}]", **columns)


def load_contrast(source: str | os.PathLike | None = None, split: str = "train", **columns: str) -> ContrastSet:
    """One entry point: ``None``/``"builtin"`` → built-in set; an existing path → file; otherwise a hub name."""
    if source is None or source == BUILTIN_NAME:
        return load_builtin(split)  # type: ignore[arg-type]
    text = os.fspath(source)
    if os.path.exists(text):
        return load_contrast_file(text, split=split, **columns)
    from .datafiles import FILE_BUILDERS

    if os.path.splitext(text)[1].lower() in FILE_BUILDERS:
        raise FileNotFoundError(f"no prompt file at {text!r}")
    return load_hub_contrast(text, split=split, **columns)
