"""``accelerate launch … -m orthoreg.train`` as users run it: two gloo ranks on CPU, end to end, and a GPU launcher on a
machine without GPUs.

The two-rank run uses the launch form documented in ``recipes/README.md`` (``ACCELERATE_USE_CPU=1 accelerate launch
--config_file recipes/accelerate/cpu.yaml``; ``--cpu --num_processes 2`` would silently start one process) with the
toy world: model=tiny, a toy narrow task, the orthoreg preset with both terms (covariance gathered across ranks), the
toy scorer (without ``orthoreg.testbed``: the tiny model with the BPE tokenizer on the shipped local QA task). Asserted: both ranks trained (world size 2 in the Trainer, the regulariser's metrics logged), one run
directory, ``results.json`` written once and by rank 0 (it is opened with O_EXCL, so a second writer would crash the
run), Hydra's ``.hydra/`` written once, the ranks ended cleanly (status 0, no exit-time abort).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed._launch import output_tail

pytestmark = pytest.mark.distributed

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true", "PYTHONUNBUFFERED": "1"}
# Variables of an outer launcher that would make the child think it is already one rank of another job.
STRIP = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
         "GROUP_RANK", "ROLE_RANK", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU",
         "ORTHOREG_RUN_STAMP")

ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TINY_RUN = [
    "model=tiny", "task=toy_unsafe_code", "reg=orthoreg", "eval=toy", "eval.n_samples=72",
    "task.num_examples=32", "finetune.max_steps=4", "finetune.per_device_train_batch_size=4",
    "finetune.gradient_accumulation_steps=1", "finetune.learning_rate=1e-3", "finetune.warmup_steps=0",
    "finetune.logging_steps=1", "finetune.save_steps=2", "overlap.num_examples=16", "progress=false",
]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): torchrun puts each rank in a session of its own."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _accelerate(args: list[str], env: dict[str, str] | None = None, timeout: float = 240):
    """Runs ``accelerate launch *args``; returns (status, combined output, seconds). On a timeout the launcher and
    all its ranks are killed (by pid) and the test fails with the output's tail."""
    child_env = {k: v for k, v in os.environ.items() if k not in STRIP}
    child_env.update(ENV)
    child_env.update(env or {})
    start = time.monotonic()
    proc = subprocess.Popen([*ACCELERATE, *args], cwd=str(REPO_ROOT), env=child_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        output, _ = proc.communicate()
        pytest.fail(f"accelerate launch did not finish within {timeout:.0f} s\n{output_tail(output)}")
    return proc.returncode, output, time.monotonic() - start


def _testbed_ready() -> bool:
    from orthoreg.recipes_lib.models import testbed_available

    return testbed_available()


def test_two_rank_cpu_launch_end_to_end(tmp_path):
    # The toy world when it is installed; otherwise the same tiny model with the BPE tokenizer trained in code on the
    # shipped local QA task, without evaluation (so the launch itself is always tested).
    toy = _testbed_ready()
    recipe = TINY_RUN if toy else [
        *(a for a in TINY_RUN if not a.startswith(("task=", "eval"))),
        "task=tiny_factual_qa", "eval=none", "model.tokenizer=bpe", "model.assets=null"]
    run = tmp_path / "run"
    code, output, _ = _accelerate(
        ["--config_file", "recipes/accelerate/cpu.yaml", "-m", "orthoreg.train", *recipe, f"hydra.run.dir={run}"],
        env={"ACCELERATE_USE_CPU": "1"})
    assert code == 0, output_tail(output)
    assert "terminate called" not in output and "SIGABRT" not in output  # ranks ended cleanly (os._exit path)

    results = list(tmp_path.rglob("results.json"))
    assert results == [run / "results.json"], results  # one run directory, one results file
    result = json.loads(results[0].read_text())
    assert result["run"]["written_by_rank"] == 0
    assert result["run"]["world_size"] == 2 and result["run"]["strategy"] == "ddp"
    assert result["train"]["world_size"] == 2  # the Trainer really ran data-parallel over two ranks
    assert result["train"]["global_step"] == 4
    metrics = result["train"]["last_regularizer_metrics"]
    assert metrics["orthoreg/proj"] >= 0 and metrics["orthoreg/cov"] >= 0
    # pipeline: directions → overlap → eval before → train → eval after → shift overlap → one row
    assert result["directions"]["source"] == ("toy" if toy else "builtin")
    assert 0.0 <= result["overlap"]["score"] <= 1.0 and result["overlap"]["mode"] == "gradient"
    assert result["overlap"]["after_training"]["mode"] == "shift"
    if toy:
        before, after = result["harmful_rate"]["before"], result["harmful_rate"]["after"]
        assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
        assert result["harmful_rate"]["rise_pp"] == pytest.approx(100 * (after - before))
        assert result["eval"]["before"]["n_samples"] == result["eval"]["after"]["n_samples"] == 72
    assert result["config"]["reg"]["orthoreg"]["gather"] is True  # the resolved config travels with the results
    # only rank 0 wrote: one .hydra folder, one table row, no per-rank copies
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert [p.name for p in tmp_path.rglob(".hydra")] == [".hydra"]
    assert (run / "table_row.md").read_text().count("| tiny Llama (toy world) |") == 1
    assert (run / "directions.safetensors").is_file() and (run / "checkpoints" / "checkpoint-4").is_dir()


def test_gpu_launcher_without_gpus_fails_fast(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    run = tmp_path / "run"
    code, output, seconds = _accelerate(
        ["--config_file", "recipes/accelerate/multi_gpu.yaml", "--num_processes", "2", "-m", "orthoreg.train",
         "model=tiny", f"hydra.run.dir={run}"], timeout=120)
    assert code != 0
    assert "multi-GPU launch (2 processes" in output and "no CUDA device is visible" in output
    assert "ACCELERATE_USE_CPU=1 accelerate launch --config_file recipes/accelerate/cpu.yaml" in output  # the fix
    assert not run.exists()  # stopped before Hydra, before any model or data was touched
    assert seconds < 90
