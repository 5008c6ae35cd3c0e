"""Fine-tuning task data: Hub datasets (through ``datasets``), local files that override them, and the toy world.

``task.kind``:

- ``hub``: ``task.dataset`` = {path, name, split} for ``datasets.load_dataset``; ``task.local_file`` (JSONL, JSON,
  CSV or Parquet with the same columns, or already ``prompt``/``completion`` / ``messages``) replaces it. Offline
  without a cached copy → a RecipeError naming the file to provide and its columns.
- ``local``: ``task.local_file`` only (e.g. ``recipes/data/tiny_factual_qa.jsonl``).
- ``toy``: ``task.toy_task`` is a narrow task of ``orthoreg.testbed`` (pre-tokenised, assistant-only labels).

Records become prompt/completion pairs through ``task.format.prompt`` / ``task.format.completion``: templates whose
``{field}`` placeholders take dotted paths into the record (``{answer.value}``, ``{answers.text.0}``). A template
given as a list joins its non-empty parts with a blank line (Alpaca's optional ``input``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orthoreg.core.datafiles import hub_offline

from .config import resolve_recipe_path, to_container
from .errors import RecipeError

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
# Task files a recipe reads (orthoreg.core.datafiles reads them with datasets; .txt lines are no task layout).
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class TaskData:
    """What a task provides: ``records`` (raw or pre-tokenised rows) and where they came from."""

    name: str
    kind: str
    records: list[dict[str, Any]]
    source: str
    info: dict[str, Any] = field(default_factory=dict)


def lookup(record: Any, path: str) -> Any:
    """``record`` at a dotted path; integer parts index lists (``answers.text.0``)."""
    node = record
    for part in path.split("."):
        if isinstance(node, dict):
            if part not in node:
                raise KeyError(path)
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.lstrip("-").isdigit():
            node = node[int(part)]
        else:
            raise KeyError(path)
    return node


def render(template: Any, record: dict[str, Any]) -> str:
    """Fills a template (string, or list of strings joined by blank lines, skipping empty parts) from ``record``."""
    if isinstance(template, (list, tuple)):
        parts = [render(t, record) for t in template]
        return "\n\n".join(p for p in parts if p.strip())

    def fill(match: re.Match) -> str:
        value = lookup(record, match.group(1).strip())
        return "" if value is None else str(value)

    return _PLACEHOLDER.sub(fill, str(template))


def _template_fields(template: Any) -> list[str]:
    if isinstance(template, (list, tuple)):
        return [f for t in template for f in _template_fields(t)]
    return [m.group(1).strip() for m in _PLACEHOLDER.finditer(str(template))]


def _expected_columns(task_cfg: Any) -> str:
    fmt = to_container(task_cfg.get("format")) or {}
    fields = _template_fields(fmt.get("prompt", "")) + _template_fields(fmt.get("completion", ""))
    listed = ", ".join(f"`{f}`" for f in dict.fromkeys(fields)) or "the dataset's columns"
    return f"{listed} (or `prompt`/`completion`, or `messages`)"


def _read_local(path: str) -> list[dict[str, Any]]:
    from orthoreg.core.datafiles import read_file

    suffix = Path(path).suffix.lower()
    if suffix not in _FILE_BUILDERS:
        raise RecipeError(f"`task.local_file` {path}: unsupported file type {suffix!r}; use one of "
                          f"{sorted(_FILE_BUILDERS)}")
    return read_file(path, error=RecipeError)


def _read_hub(task_cfg: Any) -> list[dict[str, Any]]:
    from datasets import load_dataset

    spec = to_container(task_cfg.get("dataset")) or {}
    path = spec.get("path")
    if not path:
        raise RecipeError(f"task {task_cfg.get('name')!r} sets neither `task.dataset.path` nor `task.local_file`")
    try:
        dataset = load_dataset(path, spec.get("name"), split=spec.get("split", "train"))
    except Exception as err:  # noqa: BLE001 - datasets raises many types here (connection, not found, offline, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f"{path}" + (f" (config {spec.get('name')!r})" if spec.get("name") else "")
        offline = ("This machine is offline (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) and the dataset is not in the "
                   "local cache. " if hub_offline() else "")
        raise RecipeError(
            f"task {task_cfg.get('name')!r} needs the Hub dataset {where}, split {spec.get('split', 'train')!r}, "
            f"which could not be loaded ({type(err).__name__}: {first}). {offline}Provide a local copy: "
            f"task.local_file=/path/to/{Path(path).name}.jsonl with columns {_expected_columns(task_cfg)}"
        ) from err
    return [dict(row) for row in dataset]


def _subsample(records: list[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    if not n or n >= len(records):
        return records
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in sorted(order[:n])]


def load_records(task_cfg: Any, seed: int = 0) -> TaskData:
    """Reads a task's raw records (no tokenizer needed), so a missing dataset fails before the model loads.

    Raises:
        RecipeError: unknown kind, missing local file, unavailable Hub dataset, or orthoreg.testbed missing.
    """
    kind = task_cfg.get("kind")
    name = task_cfg.get("name")
    n = task_cfg.get("num_examples")
    if kind == "toy":
        from .models import testbed_available

        if not testbed_available():
            raise RecipeError(f"task {name!r} is a toy-world task and needs orthoreg.testbed, which is not installed")
        from orthoreg.testbed import world

        toy = task_cfg.get("toy_task")
        if toy not in world.NARROW_TASKS:
            raise RecipeError(f"`task.toy_task` {toy!r} is not a toy-world task; valid: {sorted(world.NARROW_TASKS)}")
        return TaskData(name, kind, [], f"orthoreg.testbed:{toy}", {"toy_task": toy, "num_examples": n})
    if kind not in ("hub", "local"):
        raise RecipeError(f"`task.kind` must be hub, local or toy; got {kind!r}")
    local = resolve_recipe_path(task_cfg.get("local_file"))
    if local:
        if not Path(local).is_file():
            raise RecipeError(f"`task.local_file` {local} does not exist; it should hold columns "
                              f"{_expected_columns(task_cfg)}")
        records, source = _read_local(local), local
    elif kind == "local":
        raise RecipeError(f"task {name!r} is local and needs `task.local_file`")
    else:
        records = _read_hub(task_cfg)
        spec = to_container(task_cfg.get("dataset"))
        source = f"hub:{spec.get('path')}" + (f"/{spec['name']}" if spec.get("name") else "")
    if not records:
        raise RecipeError(f"task {name!r}: {source} holds no records")
    records = _subsample(records, n, seed)
    return TaskData(name, kind, records, source, {"num_examples": len(records)})


def to_examples(task: TaskData, task_cfg: Any, tokenizer, seed: int = 0) -> list[dict[str, Any]]:
    """Training examples in a layout TRL's SFTTrainer takes as is.

    Toy tasks: ``input_ids`` + ``labels`` (assistant tokens only). Text tasks: ``prompt``/``completion`` pairs —
    conversational (chat messages) when the tokenizer has a chat template and ``task.chat`` is on, so the loss is on
    the completion only either way.
    """
    if task.kind == "toy":
        from orthoreg.testbed.tokenizer import encode_task, token_ids
        from orthoreg.testbed.world import ASSISTANT, END

        try:
            token_ids(tokenizer, [ASSISTANT, END])
        except ValueError as err:
            raise RecipeError(f"task {task.name!r} is a toy-world task; it needs model=tiny with the world tokenizer "
                              f"({err})") from err
        n = int(task.info.get("num_examples") or 256)
        return encode_task(tokenizer, task.info["toy_task"], n, seed)
    fmt = to_container(task_cfg.get("format")) or {}
    use_chat = bool(task_cfg.get("chat", True)) and bool(getattr(tokenizer, "chat_template", None))
    examples = []
    for i, record in enumerate(task.records):
        if "messages" in record and isinstance(record["messages"], list):
            examples.append({"messages": record["messages"]})
            continue
        try:
            if "prompt" in record and "completion" in record and not fmt:
                prompt, completion = record["prompt"], record["completion"]
            else:
                prompt, completion = render(fmt["prompt"], record), render(fmt["completion"], record)
        except KeyError as err:
            raise RecipeError(
                f"task {task.name!r}: record #{i} from {task.source} has no field {err.args[0]!r} (it has "
                f"{sorted(record)}); fix `task.format` or give a file with columns {_expected_columns(task_cfg)}"
            ) from None
        if isinstance(prompt, list) or isinstance(completion, list):
            examples.append({"prompt": prompt, "completion": completion})
        elif use_chat:
            examples.append({"prompt": [{"role": "user", "content": str(prompt)}],
                             "completion": [{"role": "assistant", "content": str(completion)}]})
        else:
            sep = "" if str(prompt).endswith((" ", "\n")) else " "
            examples.append({"prompt": str(prompt) + sep, "completion": str(completion)})
    return examples
