"""Task data for the audit: reading task examples, tokenising them with their loss labels, and padding them into
batches.

The layouts (``text``, ``prompt``/``completion``, chat ``messages``, pre-tokenized ``input_ids``) are the dataset
formats of TRL's ``SFTTrainer``; the loss labels follow the same rules (completion only, assistant turns only), so
the audit differentiates the loss the fine-tune will minimise.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["TaskDataError", "encode_task_examples", "load_task_examples", "task_batches"]


class TaskDataError(ValueError):
    """The task data cannot be read or tokenised (unknown layout, no chat template for messages, no tokens)."""


def load_task_examples(
    source: str | os.PathLike, limit: int | None = None, *, split: str = "train", config: str | None = None
) -> list[dict[str, Any]]:
    """Reads task examples (see :func:`encode_task_examples` for the layouts) with ``datasets``: a
    ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a ``.txt`` file (one ``{"text": line}`` per line), or a Hub
    dataset name (``split``/``config`` of ``datasets.load_dataset``).

    Raises:
        FileNotFoundError: a local file that does not exist.
        TaskDataError: the file or dataset cannot be read, or holds no examples.
    """
    from ..core.datafiles import is_local_source, read_records

    source = os.fspath(source)
    if is_local_source(source) and not os.path.isfile(source):
        raise FileNotFoundError(f"no task data file at {source!r}")
    records = read_records(
        source, split=split, config=config, error=TaskDataError,
        fix="Export it to a local JSONL/CSV/Parquet file with `text`, `prompt`+`completion` or `messages` columns "
            "and pass that file",
    )
    if not records:
        raise TaskDataError(f"{source} holds no examples")
    return records[:limit] if limit else records


def _encode_messages(tokenizer: Any, messages: list[dict[str, Any]], warned: list[bool]) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise TaskDataError("an example has `messages` but the tokenizer has no chat template; give `text` or "
                            "`prompt`/`completion` fields instead, or use the model's chat tokenizer")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    labels = [-100] * len(ids)
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        # Label the tokens between "history + generation prompt" and "history + this reply" (TRL's prefix method).
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(before)):
            if not warned[0]:
                warnings.warn("the chat template does not render conversations prefix by prefix; the loss covers "
                              "every token of those examples", stacklevel=4)
                warned[0] = True
            return ids, list(ids)
        start = len(tokenizer(before, add_special_tokens=False)["input_ids"]) if before else 0
        end = len(tokenizer(through, add_special_tokens=False)["input_ids"])
        labels[start:end] = ids[start:end]
    return ids, labels


def encode_task_examples(
    tokenizer: Any, examples: Iterable[Any], *, max_length: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example; labels are -100 where no loss is taken.

    Accepted examples: a string or ``{"text": …}`` (loss on every token); ``{"prompt": …, "completion": …}``
    (loss on the completion; lists of messages use the chat template); ``{"messages": [...]}`` (chat template,
    loss on assistant turns); ``{"input_ids": [...], "labels": [...]}`` (used as given). Examples longer than
    ``max_length`` keep their first ``max_length`` tokens, with one warning.

    Raises:
        TaskDataError: an example has none of these layouts, or needs a tokenizer that was not given.
    """
    out, truncated, warned = [], 0, [False]
    for n, example in enumerate(examples):
        if isinstance(example, Mapping) and "input_ids" in example:
            ids = [int(i) for i in torch.as_tensor(example["input_ids"]).flatten().tolist()]
            labels = example.get("labels")
            labels = ids if labels is None else [int(i) for i in torch.as_tensor(labels).flatten().tolist()]
        else:
            if tokenizer is None:
                raise TaskDataError("text examples need a tokenizer; pass `tokenizer=` (or pre-tokenized input_ids)")
            if isinstance(example, str) or (isinstance(example, Mapping) and isinstance(example.get("text"), str)):
                text = example if isinstance(example, str) else example["text"]
                ids = list(tokenizer(text)["input_ids"])
                labels = ids
            elif isinstance(example, Mapping) and "prompt" in example and "completion" in example:
                prompt, completion = example["prompt"], example["completion"]
                if isinstance(prompt, list) and isinstance(completion, list):
                    ids, labels = _encode_messages(tokenizer, prompt + completion, warned)
                    n_prompt = len(tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False,
                                                                           add_generation_prompt=True),
                                             add_special_tokens=False)["input_ids"])
                    labels = [-100] * n_prompt + labels[n_prompt:]
                else:
                    p_ids = list(tokenizer(str(prompt))["input_ids"])
                    c_ids = list(tokenizer(str(completion), add_special_tokens=False)["input_ids"])
                    ids, labels = p_ids + c_ids, [-100] * len(p_ids) + c_ids
            elif isinstance(example, Mapping) and isinstance(example.get("messages"), list):
                ids, labels = _encode_messages(tokenizer, example["messages"], warned)
            else:
                keys = sorted(example) if isinstance(example, Mapping) else type(example).__name__
                raise TaskDataError(
                    f"task example #{n} ({keys}) has no usable layout; give `text`, `prompt`+`completion`, "
                    "`messages`, or `input_ids`"
                )
        if len(ids) != len(labels):
            raise TaskDataError(f"task example #{n}: {len(ids)} input_ids but {len(labels)} labels")
        if not ids:
            continue
        if max_length is not None and len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        out.append((ids, labels))
    if truncated:
        warnings.warn(f"{truncated} task example(s) exceed {max_length} tokens; kept the first {max_length} of each "
                      "(the mean direction barely depends on a long example's tail)", stacklevel=2)
    if not out:
        raise TaskDataError("the task data holds no tokens")
    return out


def task_batches(
    encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Pads encoded examples (from :func:`encode_task_examples`) into batches of ``batch_size`` on ``device``.

    Examples are sorted by length first, so a batch holds similar lengths and little padding; the order of the
    batches therefore differs from the order of the examples. Yields ``input_ids``, ``attention_mask`` and
    ``labels`` (-100 on padding); a generator, so one padded batch exists at a time.
    """
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths: less padding
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, lab) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(lab)
            attention_mask[row, : len(ids)] = 1
        yield {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
               "labels": labels.to(device)}

