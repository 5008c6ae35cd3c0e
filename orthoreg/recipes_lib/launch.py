"""Distributed launch plumbing: launcher checks, one Hydra run directory for all ranks, rank-0 I/O, clean exit.

``accelerate launch`` starts the ranks through torchrun and passes what the launcher config asked for only as
environment variables (``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_USE_FSDP``,
``ACCELERATE_USE_CPU``). :func:`check_launcher` compares them with the machine before anything heavy happens, so a
GPU launcher on a machine without GPUs, or more processes than devices, fails in about a second with a message
naming the fix.

Hydra under several ranks (facebookresearch/hydra#2070): every rank resolves ``${now:}`` itself and may get
another run directory, and all ranks would write ``.hydra/``. :func:`agree_on_run_stamp` lets rank 0 pick the
timestamp and broadcasts it (``ORTHOREG_RUN_STAMP``, read by ``hydra.run.dir`` in ``recipes/train.yaml``), and
:func:`hydra_rank_overrides` stops non-zero ranks from writing Hydra's files. Multirun inside a launch is refused
(every rank would run the whole sweep and its second job finds the process group destroyed).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import RecipeError

CPU_LAUNCH = ("ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu.yaml "
              "-m orthoreg.train ...")
_TRUE = ("1", "true", "yes", "on")


def _flag(env, name: str) -> bool:
    return str(env.get(name, "")).strip().lower() in _TRUE


@dataclass(frozen=True)
class LaunchInfo:
    """What this process was launched as, read from the environment (no process group needed)."""

    world_size: int
    rank: int
    local_rank: int
    local_world_size: int
    use_cpu: bool
    strategy: str  # "single", "ddp", "deepspeed" or "fsdp"
    cuda_devices: int
    cpu_count: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_info(env=None, cuda_devices: int | None = None, cpu_count: int | None = None) -> LaunchInfo:
    """Reads the launch from ``env`` (default ``os.environ``); device counts are probed unless given (tests)."""
    env = os.environ if env is None else env
    if cuda_devices is None:
        import torch

        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cpu_count = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    world = int(env.get("WORLD_SIZE", 1))
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        strategy = "deepspeed"
    elif _flag(env, "ACCELERATE_USE_FSDP"):
        strategy = "fsdp"
    else:
        strategy = "ddp" if world > 1 else "single"
    use_cpu = _flag(env, "ACCELERATE_USE_CPU") or (cuda_devices == 0 and world == 1 and strategy == "single")
    return LaunchInfo(
        world_size=world, rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)), use_cpu=use_cpu, strategy=strategy,
        cuda_devices=cuda_devices, cpu_count=cpu_count,
    )


def check_launcher(info: LaunchInfo) -> None:
    """Refuses a launch that does not fit this machine.

    Raises:
        RecipeError: a DeepSpeed/FSDP launcher without GPUs; a multi-process GPU launcher without GPUs; more
            processes per node than visible GPUs (or, with ``ACCELERATE_USE_CPU=1``, than CPU cores).
    """
    procs = info.local_world_size
    if info.strategy in ("deepspeed", "fsdp") and info.cuda_devices == 0:
        name = "zero2/zero3" if info.strategy == "deepspeed" else "fsdp2"
        raise RecipeError(
            f"the {name} launcher ({info.strategy}) needs GPUs, but no CUDA device is visible on this machine. "
            f"On CPU use the DDP launcher: {CPU_LAUNCH} (DeepSpeed/FSDP through `accelerate launch` do not run on "
            "CPU; see recipes/README.md)"
        )
    if info.use_cpu:
        if procs > info.cpu_count:
            raise RecipeError(
                f"the launch asks for {procs} processes on this machine but it has {info.cpu_count} CPU cores; pass "
                f"--num_processes {info.cpu_count} (or fewer) to accelerate launch"
            )
        return
    if info.distributed and info.cuda_devices == 0:
        raise RecipeError(
            f"this is a multi-GPU launch ({info.world_size} processes, strategy {info.strategy}) but no CUDA device is "
            f"visible on this machine. On CPU use: {CPU_LAUNCH}"
        )
    if info.cuda_devices and procs > info.cuda_devices:
        raise RecipeError(
            f"the launch asks for {procs} processes on this node but only {info.cuda_devices} GPU(s) are visible; pass "
            f"--num_processes {info.cuda_devices} to accelerate launch (or set CUDA_VISIBLE_DEVICES)"
        )


def check_no_multirun(argv: list[str], info: LaunchInfo) -> None:
    """Refuses Hydra multirun inside a multi-process launch (sweeps loop over launches)."""
    if not info.distributed:
        return
    if any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in argv):
        raise RecipeError(
            "Hydra multirun (-m/--multirun) inside a distributed launch would run the whole sweep in every rank and "
            "fail on its second job (the first job's teardown destroys the process group). Loop over launches: "
            "`for reg in none orthoreg; do accelerate launch ... -m orthoreg.train reg=$reg; done`"
        )


DEFAULT_TIMEOUT_S = 7200


def init_process_group(info: LaunchInfo, env=None) -> None:
    """Creates the process group now (accelerate's ``PartialState``) so ranks can agree before Hydra runs.

    TrainingArguments later resets accelerate's state object but reuses the initialised process group. The
    collective timeout is ``$ORTHOREG_DIST_TIMEOUT_S`` (default 2 h, not torch's 30 min): ranks wait in a barrier
    while rank 0 extracts directions or a judge scores thousands of answers.
    """
    if not info.distributed:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    from datetime import timedelta

    from accelerate import PartialState

    env = os.environ if env is None else env
    seconds = int(env.get("ORTHOREG_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    PartialState(cpu=info.use_cpu, timeout=timedelta(seconds=seconds))


def broadcast_object(obj, info: LaunchInfo):
    """Rank 0's ``obj`` on every rank (identity when not distributed)."""
    if not info.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: LaunchInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def agree_on_run_stamp(info: LaunchInfo, env=None) -> str:
    """Rank 0's timestamp (or ``$ORTHOREG_RUN_STAMP`` when set by the caller), the same on every rank.

    Exported as ``ORTHOREG_RUN_STAMP`` so ``hydra.run.dir`` resolves to one folder for all ranks.
    """
    env = os.environ if env is None else env
    stamp = env.get("ORTHOREG_RUN_STAMP") or None
    if stamp is None and info.is_main:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S") + f"_{os.getpid()}"
    stamp = broadcast_object(stamp, info)
    env["ORTHOREG_RUN_STAMP"] = stamp
    return stamp


def hydra_rank_overrides(info: LaunchInfo) -> list[str]:
    """Extra Hydra overrides for non-zero ranks: no ``.hydra/`` output and no log file (rank 0 writes both)."""
    if info.is_main:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


def rank_zero_write_text(path: str | os.PathLike, text: str, info: LaunchInfo) -> Path | None:
    """Writes ``text`` to a new file on rank 0 only; a second write of the same file is an error, not a clobber."""
    if not info.is_main:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as fh:  # "x": fails if any process already wrote it
        fh.write(text)
    return path


def finish(info: LaunchInfo, code: int = 0) -> None:
    """Ends a distributed rank: barrier, destroy the process group, then ``os._exit`` without interpreter teardown.

    gloo ranks sometimes abort at interpreter exit after their work is done (SIGABRT, about 1 run in 5); this
    exit path avoids it. A single process just returns.
    """
    if not info.distributed:
        if code:
            sys.exit(code)
        return
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
