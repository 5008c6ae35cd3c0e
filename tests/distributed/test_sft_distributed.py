"""``accelerate launch -m orthoreg.sft`` on two gloo CPU ranks, as a user launches it on GPUs.

``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`` is the form that really starts two CPU
ranks (``--cpu --num_processes 2`` silently starts one). The tiny model and JSONL dataset are written by the test.
Asserted on what rank 0 leaves in ``output_dir``: the run had world size 2, the built-in directions were extracted
once (by the main process) and every logged step carries the ``orthoreg/...`` metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.distributed._launch import BASE_ENV, REPO_ROOT, STRIP_ENV, free_port, kill_tree, output_tail
from tests.distributed.scripts.sft_assets import write_tiny_sft_assets

pytestmark = pytest.mark.distributed

# The activation projection (the defaults are OrthoRegConfig.recommended(): the reader term and the anchor KL).
PROJECTION = ["--orthoreg_proj_weight", "1", "--orthoreg_reader_weight", "0", "--orthoreg_anchor_kl_weight", "0",
              "--orthoreg_units", "absolute"]
COMMON = ["--per_device_train_batch_size", "2", "--logging_steps", "1", "--use_cpu", "--report_to", "none",
          "--disable_tqdm", "true", "--save_strategy", "no", "--learning_rate", "1e-3", "--max_steps", "3"]


def _launch_sft(args: list[str], timeout: float = 240) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*STRIP_ENV, "ACCELERATE_USE_FSDP")}
    env.update(BASE_ENV)
    env["ACCELERATE_USE_CPU"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "orthoreg.sft", *args]
    proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        output, _ = proc.communicate()
        pytest.fail(f"accelerate launch -m orthoreg.sft did not finish within {timeout:.0f} s\n{output_tail(output)}")
    return proc.returncode, output


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_sft_assets(tmp_path_factory.mktemp("sft-assets"))


@pytest.mark.parametrize("variant", ["builtin_full_gather", "packing_peft"])
def test_two_ranks(assets, tmp_path, variant):
    out = tmp_path / "out"
    extra = {
        # full fine-tuning, both terms, the covariance of the gathered global batch; directions from rank 0
        "builtin_full_gather": [*PROJECTION, "--orthoreg_layers", "1,2", "--orthoreg_cov_weight", "1e-3",
                                "--orthoreg_gather", "--orthoreg_mask", "labels"],
        "packing_peft": [*PROJECTION, "--packing", "--max_length", "48", "--use_peft", "--lora_r", "4",
                         "--lora_target_modules", "o_proj", "down_proj", "--orthoreg_layers", "-1"],
    }[variant]
    start = time.monotonic()
    code, output = _launch_sft(["--model_name_or_path", assets["model"], "--dataset_name", assets["data"],
                                "--output_dir", str(out), *COMMON, *extra])
    seconds = time.monotonic() - start
    assert code == 0, output_tail(output)
    assert "terminate called" not in output  # ranks ended through os._exit after their work
    run = json.loads((out / "orthoreg_run.json").read_text())
    assert run["world_size"] == 2
    assert run["directions"]["source"] == "builtin"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logs = [entry for entry in history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["orthoreg/proj"] >= 0 and "orthoreg/total" in entry
    if variant == "builtin_full_gather":
        assert run["orthoreg"]["gather"] is True and run["directions"]["layers"] == [1, 2]
        assert all(entry["orthoreg/cov"] > 0 and entry["orthoreg/proj"] > 0 for entry in logs)
    else:
        assert run["directions"]["layers"] == [2]  # -1 of 3 layers
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert output.count("orthoreg: {") == 1  # the settings are printed once, by the main process
    print(f"{variant}: {seconds:.1f} s")


@pytest.mark.parametrize("peft", [False, True])
def test_two_ranks_recommended_default(assets, tmp_path, peft):
    """No --orthoreg_* flag: the main process records the built-in input subspaces, every rank receives them; the
    anchor KL runs beside the reader term under DDP (0 at the base, before the first update; then it grows)."""
    from orthoreg import InputSubspaces

    out = tmp_path / "out"
    lora = ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "down_proj"] if peft else []
    code, output = _launch_sft(["--model_name_or_path", assets["model"], "--dataset_name", assets["data"],
                                "--output_dir", str(out), *COMMON, *lora])
    assert code == 0, output_tail(output)
    run = json.loads((out / "orthoreg_run.json").read_text())
    assert run["world_size"] == 2 and run["input_subspaces"] == "builtin" and run["directions"] == {"source": None}
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(logs) == 3 and logs[0]["orthoreg/reader"] == 0.0 and logs[-1]["orthoreg/reader"] > 0
    first, last = logs[0]["orthoreg/anchor_kl"], logs[-1]["orthoreg/anchor_kl"]
    assert abs(first) < 1e-5 and last > 10 * abs(first)
    subspaces = InputSubspaces.from_pretrained(out / "orthoreg_input_subspaces")
    assert subspaces.metadata["prompt_set"]["count"] == 200
