"""User data read through ``datasets``: local JSON/JSONL/CSV/Parquet/text files and Hub dataset names.

One reader for every place orthoreg takes user data (contrast prompts, prompt lists, audit task data, recipe
files), so every format ``datasets.load_dataset`` reads works everywhere and the errors are the same. Conventions
kept from the hand-written readers this replaces:

- ``.json`` is a list of objects, or ``{"data": [...]}``; ``.jsonl`` one object per line;
- CSV cells stay text exactly as written (``"007"`` is not the number 7; an empty cell is ``""``), as
  ``csv.DictReader`` gave them;
- ``.txt`` gives one record ``{"text": line}`` per non-blank line.

Errors are raised as the caller's error type (``PromptSetError``, ``TaskDataError``, ``RecipeError``), naming the
file and what to fix; a missing file is a ``FileNotFoundError``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterator
from typing import Any

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` forbid downloads."""
    return any(os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def is_local_source(source: str) -> bool:
    """A path to read from disk (it exists, or it names a file type): not a Hub dataset name."""
    return os.path.exists(source) or os.path.splitext(source)[1].lower() in FILE_BUILDERS


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    # datasets logs its own parse failures and draws a progress bar per file; the caller reports one clear error.
    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    verbosity = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _first_bad_json_line(path: str) -> int | None:
    """The first line of a JSONL file that is not JSON, for the error message only (datasets reports a row of a
    chunk, not a line)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError:
                    return lineno
    return None


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def read_file(path: str | os.PathLike, *, error: type[Exception] = ValueError) -> list[dict[str, Any]]:
    """The records of a local ``.jsonl``/``.json``/``.csv``/``.parquet``/``.txt`` file, read with
    ``datasets.load_dataset`` (cached in the datasets cache like any local dataset).

    Raises:
        FileNotFoundError: no file at ``path``.
        error: an unsupported file type, or a file ``datasets`` cannot parse (with the line for JSONL).
    """
    from datasets import Features, Value, load_dataset

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file at {path!r}" if not os.path.isdir(path) else f"{path!r} is a folder; "
                                "give a .jsonl, .json, .csv, .parquet or .txt file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_BUILDERS:
        raise error(f"{path}: unsupported file type {ext!r}; use .jsonl, .json, .csv, .parquet or .txt")
    options: dict[str, Any] = {}
    if ext == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            header = next(csv.reader(fh), None)
        if not header:
            raise error(f"{path} holds no rows (not even a header)")
        options = dict(features=Features({name: Value("string") for name in header}), keep_default_na=False)
    try:
        with _quiet_datasets():
            dataset = load_dataset(FILE_BUILDERS[ext], data_files=path, split="train", **options)
    except Exception as err:  # noqa: BLE001 - datasets wraps pyarrow/pandas/json errors in several types
        if "corresponds to no data" in str(err):  # an empty file: no split at all
            return []
        cause = _root_cause(err)
        if ext == ".jsonl":
            line = _first_bad_json_line(path)
            where = f"{path}:{line}" if line else path
            raise error(f"{where} is not valid JSON ({cause}); each line must be one JSON object") from err
        if ext == ".json":
            raise error(f"{path}: expected a list of objects, or {{\"data\": [...]}}, in valid JSON ({cause})") \
                from err
        raise error(f"{path} cannot be read as {ext[1:].upper()} ({type(cause).__name__}: {cause})") from err
    if ext == ".json" and dataset.column_names == ["data"] and len(dataset) == 1 and isinstance(dataset[0]["data"],
                                                                                                    list):
        records = dataset[0]["data"]  # {"data": [...]}: the records are inside
    else:
        records = dataset.to_list()
    if not all(isinstance(r, dict) for r in records):
        raise error(f"{path}: expected a list of objects (one per prompt or example)")
    if ext == ".txt":
        records = [r for r in records if r["text"].strip()]
    return records


def read_hub(name: str, *, split: str = "train", config: str | None = None, error: type[Exception] = ValueError,
             fix: str = "export it to a local JSONL/CSV/Parquet file and pass that file") -> list[dict[str, Any]]:
    """The records of a Hub dataset (``datasets.load_dataset(name, config, split=split)``, cached).

    Raises:
        error: the dataset cannot be loaded (offline and not cached, unknown name, no access, unknown split),
            with ``fix``.
    """
    from datasets import load_dataset

    try:
        with _quiet_datasets():
            dataset = load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many unrelated types for "not reachable"
        reason = "offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if hub_offline() else type(err).__name__
        raise error(f"could not load the dataset {name!r} (split={split!r}): {reason}: {err}. {fix}") from err
    return dataset.to_list()


def read_records(source: str | os.PathLike, *, split: str = "train", config: str | None = None,
                 error: type[Exception] = ValueError, fix: str | None = None) -> list[dict[str, Any]]:
    """A local file (:func:`read_file`) when ``source`` exists or names a file type, else a Hub dataset
    (:func:`read_hub`)."""
    text = os.fspath(source)
    if is_local_source(text):
        return read_file(text, error=error)
    return read_hub(text, split=split, config=config, error=error, **({"fix": fix} if fix else {}))
