"""What a ``transformers`` TrainerCallback needs to know about its Trainer: the micro-batches of each optimizer step,
the ``checkpoint-N`` folders, the logs (metrics averaged over data-parallel ranks, added where reporters read them),
the callback order, and the Trainer that holds a callback."""

from __future__ import annotations

import gc
import os
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback, TrainerState, TrainingArguments

__all__ = ["accumulation_scale", "add_to_logs", "checkpoint_folder", "dataloader_length", "find_trainer",
           "micro_batches_in_step", "move_ahead_of_reporters", "report_metrics"]


def micro_batches_in_step(global_step: int, accumulation_steps: int, steps_in_epoch: int | None) -> int:
    """How many micro-batches the Trainer runs in optimizer step ``global_step``: ``accumulation_steps``, except in
    the last step of each epoch when the epoch's ``steps_in_epoch`` micro-batches do not divide evenly (the Trainer
    chunks every epoch from its start, so that step gets the remainder). ``steps_in_epoch=None`` (a dataloader
    without a length, which the Trainer also treats as an endless stream): always ``accumulation_steps``."""
    if steps_in_epoch is None or steps_in_epoch <= 0 or accumulation_steps <= 1:
        return max(accumulation_steps, 1)
    per_epoch = -(-steps_in_epoch // accumulation_steps)
    remainder = steps_in_epoch % accumulation_steps or accumulation_steps
    return remainder if global_step % per_epoch == per_epoch - 1 else accumulation_steps


def accumulation_scale(args: TrainingArguments, state: TrainerState, steps_in_epoch: int | None) -> float:
    """1 / the micro-batches of optimizer step ``state.global_step``: the factor a Trainer callback's per-micro-batch
    penalty takes so that it is scaled like the task loss."""
    return 1.0 / micro_batches_in_step(state.global_step, args.gradient_accumulation_steps, steps_in_epoch)


def checkpoint_folder(args: TrainingArguments, state: TrainerState) -> str:
    """The folder the Trainer writes (or resumed from) at ``state.global_step``: ``output_dir/checkpoint-N``."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def dataloader_length(dataloader: Any) -> int | None:
    try:
        return len(dataloader) if dataloader is not None else None
    except TypeError:  # an IterableDataset without __len__
        return None


def report_metrics(metrics: dict[str, float], prefix: str, logs: dict, state: TrainerState,
                   extra: dict[str, float] | None = None) -> None:
    """Averages ``metrics`` over data-parallel ranks and adds them, prefixed, to ``logs`` and the log history.

    Every rank must call this at every log (Trainer calls ``on_log`` on all ranks), even with nothing to report:
    the ranks' key sets can differ (a rank whose micro-batches were all skipped as non-finite has only ``skipped``),
    so metrics are exchanged as whole dicts rather than by a key-by-key all-reduce that would not match up.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        metrics = _mean_over_ranks(metrics)
    if not metrics:
        return
    named = {prefix + name: value for name, value in {**metrics, **(extra or {})}.items()}
    logs.update(named)
    # Trainer.log appended a copy of `logs` to the history just before calling on_log.
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(named)


def _mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Per key, the mean over the ranks that have it (``skipped`` is summed)."""
    gathered: list[dict[str, float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, metrics)
    reduced = {}
    for key in sorted(set().union(*gathered)):
        values = [m[key] for m in gathered if key in m]
        reduced[key] = sum(values) if key == "skipped" else sum(values) / len(values)
    return reduced


def find_trainer(callback: TrainerCallback) -> Any:
    """The Trainer whose callback handler holds ``callback`` (through the garbage collector's referrers; a
    callback has no reference to its Trainer), or ``None``."""
    for handler_list in gc.get_referrers(callback):
        if not isinstance(handler_list, list):
            continue
        for handler in gc.get_referrers(handler_list):
            if type(handler).__name__ != "CallbackHandler":
                continue
            for owner in gc.get_referrers(handler):
                # Python < 3.12 keeps instance attributes in a dict that refers to the handler; later versions
                # may refer to the handler from the Trainer object itself.
                candidates = gc.get_referrers(owner) if isinstance(owner, dict) else [owner]
                for trainer in candidates:
                    if getattr(trainer, "callback_handler", None) is handler and callable(getattr(trainer, "train", None)):
                        return trainer
    return None


def add_to_logs(values: dict[str, float], logs: dict | None, state: TrainerState) -> None:
    """Adds ``values`` as they are (no averaging over ranks) to the Trainer's ``logs`` and to the history entry the
    Trainer appended for them just before calling ``on_log``."""
    if logs is None or not values:
        return
    logs.update(values)
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(values)


def move_ahead_of_reporters(callback: TrainerCallback) -> None:
    """Moves ``callback`` to the front of its Trainer's callback list.

    The reporting integrations (TensorBoard, W&B, …) are registered before user callbacks and read ``logs`` in
    ``on_log``; orthoreg adds its metrics to ``logs`` there, so it must run first for them to be reported. A
    callback has no reference to its handler, so the list holding it is found through the garbage collector (once
    per training run). Moving an element from position i to 0 while the handler iterates the list neither skips
    nor repeats any callback: positions > i are unchanged.
    """
    for referrer in gc.get_referrers(callback):
        if (
            isinstance(referrer, list)
            and referrer
            and referrer[0] is not callback
            and all(isinstance(item, TrainerCallback) for item in referrer)
            and any(type(item).__name__ == "DefaultFlowCallback" for item in referrer)
        ):
            referrer.remove(callback)
            referrer.insert(0, callback)
