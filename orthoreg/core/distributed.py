"""The data-parallel facts the front doors need outside the loss: the world size, whether this is the main process,
and handing the main process's result to every rank (what each rank must hold bit-identical: extracted directions,
input subspaces)."""

from __future__ import annotations

from typing import Any

__all__ = ["broadcast_from_main", "is_main_process", "world_size"]


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
