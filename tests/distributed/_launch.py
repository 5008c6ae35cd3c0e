"""Launch N CPU ranks with torchrun in a subprocess and collect what each rank wrote.

Shared by the distributed tests. A rank script receives ``--out DIR`` (plus any extra arguments), does its work, and
writes its results with ``write_rank_results`` (JSON and, optionally, safetensors — never pickle), then ends with
``finish(0)``: ``os._exit`` after flushing, because gloo processes sometimes abort at interpreter exit after their
work is done (about 1 run in 5 on CPU). The test reads the files, so an exit-time abort cannot turn a
correct run into a flaky failure, and a rank that never wrote its files is reported with its output.

Example (in a test)::

    from tests.distributed._launch import launch
    result = launch("tests/distributed/scripts/callback_run.py", nproc=2, args=["--backend", "ddp"], tmp_path=tmp_path)
    result.json[0]["loss"], result.tensors[1]["delta/lm_head.weight"]
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
CONFIGS = Path(__file__).resolve().parent / "configs"

BASE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DS_ACCELERATOR": "cpu",
    "WANDB_DISABLED": "true",
    "PYTHONUNBUFFERED": "1",
}
# Variables of an outer launcher that would make the child think it is already one rank of another job.
STRIP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK", "ACCELERATE_USE_DEEPSPEED")


@dataclass
class LaunchResult:
    """What a launch produced: per-rank JSON dicts and tensors (indexed by rank), the output, the wall time."""

    json: list[dict] = field(default_factory=list)
    tensors: list[dict] = field(default_factory=list)
    output: str = ""
    returncode: int | None = None
    seconds: float = 0.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    script: str | Path,
    nproc: int,
    tmp_path: str | Path,
    args: list[str] | tuple[str, ...] = (),
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
    torchrun: bool = True,
) -> LaunchResult:
    """Runs ``torchrun --nproc_per_node nproc script --out <dir> *args`` and reads every rank's result files.

    With ``torchrun=False`` (only for ``nproc=1``) the script runs as a plain ``python script``: no process group
    and no DDP wrapper, the single-process reference.

    Raises ``AssertionError`` (with the tail of the combined output) when the launch times out, or when a rank's
    result files are missing. A non-zero exit status alone is *not* an error if every rank wrote its results: the
    rank scripts end with ``os._exit`` after writing, and an abort after that point is the known gloo exit flake.
    """
    script = Path(script)
    if not script.is_absolute():
        script = (REPO_ROOT / script) if (REPO_ROOT / script).exists() else (SCRIPTS / script)
    out = Path(tmp_path) / f"{script.stem}-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    child_env = {k: v for k, v in os.environ.items() if k not in STRIP_ENV}
    child_env.update(BASE_ENV)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH", "")]))
    if env:
        child_env.update(env)
    if torchrun:
        runner = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                  "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    elif nproc == 1:
        runner = [sys.executable]
    else:
        raise ValueError("torchrun=False runs a single process; pass nproc=1")
    cmd = [*runner, str(script), "--out", str(out), *map(str, args)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=child_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            output = "(no output: a process kept the pipe open)"
        raise AssertionError(
            f"{script.name} with {nproc} ranks did not finish within {timeout:.0f} s\n{output_tail(output)}"
        ) from None
    result = LaunchResult(output=output, returncode=proc.returncode, seconds=time.monotonic() - start)
    for rank in range(nproc):
        done = out / f"rank{rank}.done"
        if not done.exists():
            raise AssertionError(
                f"rank {rank} of {script.name} wrote no results (exit status {proc.returncode})\n{output_tail(output)}"
            )
        result.json.append(json.loads((out / f"rank{rank}.json").read_text()))
        tensors_file = out / f"rank{rank}.safetensors"
        if tensors_file.exists():
            from safetensors.torch import load_file

            result.tensors.append(load_file(str(tensors_file)))
        else:
            result.tensors.append({})
    return result


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILLs the launcher and every process below it, by pid.

    torchrun starts each rank in a session of its own, so killing the launcher's process group would leave hung
    ranks behind (still holding the output pipe); the descendants are listed before anything is killed, since
    orphans are re-parented.
    """
    pids = _descendants(proc.pid)
    for pid in [proc.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _descendants(pid: int) -> list[int]:
    try:
        import psutil

        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # the process is already gone
        return []
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def output_tail(text: str, n: int = 6000) -> str:
    """The last ``n`` characters of a child's output, for a failure message."""
    return text if len(text) <= n else "…" + text[-n:]


# ---------------------------------------------------------------------- rank side
def rank_out_dir(argv: list[str] | None = None) -> tuple[Path, list[str]]:
    """Parses ``--out DIR`` from ``argv`` (default ``sys.argv[1:]``); returns it and the remaining arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    i = argv.index("--out")
    out = Path(argv[i + 1])
    return out, argv[:i] + argv[i + 2:]


def write_rank_results(out: str | Path, rank: int, data: dict, tensors: dict | None = None) -> None:
    """Writes ``rank{r}.json`` (and ``rank{r}.safetensors``), then the ``rank{r}.done`` marker the launcher checks."""
    out = Path(out)
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(out / f"rank{rank}.json")
    if tensors:
        from safetensors.torch import save_file

        tmp = out / f".rank{rank}.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.done").write_text("ok")


def run_rank(main) -> None:
    """A rank script's entry point: ``main()``, then ``finish`` (1 after printing the traceback, 0 otherwise)."""
    import traceback

    try:
        main()
    except BaseException:
        traceback.print_exc()
        finish(1)
    finish(0)


def finish(code: int = 0) -> None:
    """Ends a rank without running interpreter teardown (avoids the gloo exit-time SIGABRT)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def skip_deepspeed_shm_comm_build() -> None:
    """Stops DeepSpeed (``DS_ACCELERATOR=cpu``) from JIT-compiling its shared-memory communication op.

    ``deepspeed.comm``'s ``TorchBackend`` builds ``deepspeed_shm_comm`` whenever the op is compatible, but only
    ``inference_all_reduce`` (AutoTP inference) uses it; training collectives go through torch.distributed (gloo)
    either way. The compile costs ~25 s on an idle 2-core machine and minutes on a loaded one, so rank scripts call
    this before the first DeepSpeed engine/state is created.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
