"""The data-parallel facts the front doors need outside the loss: the world size, whether this is the main process,
and handing the main process's result to every rank (what each rank must hold bit-identical: extracted directions,
input subspaces)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["broadcast_from_main", "is_main_process", "run_on_main", "world_size"]

T = TypeVar("T")


def world_size() -> int:
    """Processes of the default process group (1 without ``torch.distributed``)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    import torch.distributed as dist

    return world_size() == 1 or dist.get_rank() == 0


def broadcast_from_main(payload: Any) -> Any:
    """The main process's ``payload`` (any picklable object built by orthoreg itself, never read from a user's file)
    on every rank; the identity in one process. Every rank must call it."""
    if world_size() == 1:
        return payload
    import torch.distributed as dist

    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main(compute: Callable[[], T], what: str, *, every_rank: bool = False) -> T:
    """``compute()`` on the main process, its result on every rank (bit-identical there); with ``every_rank`` every
    rank runs it (a DeepSpeed ZeRO-3 forward is collective) and rank 0's result is kept. Every rank must call it.

    Raises:
        whatever ``compute`` raises, in one process; with several, ``RuntimeError`` naming ``what`` and the main
        process's error, on every rank (so no rank waits forever for a result that will not come).
    """
    if world_size() == 1:
        return compute()
    payload: dict[str, Any] = {"error": None, "result": None}
    if every_rank or is_main_process():
        try:
            payload["result"] = compute()
        except Exception as err:  # noqa: BLE001 - shared with every rank below, then raised there
            payload["error"] = f"{type(err).__name__}: {err}"
    payload = broadcast_from_main(payload)
    if payload["error"]:
        raise RuntimeError(f"{what} failed on the main process: {payload['error']}")
    return payload["result"]
