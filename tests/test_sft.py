"""``orthoreg sft`` end to end in one process: TRL's SFT script surface plus the ``--orthoreg_*`` flags.

A tiny config-built Llama (saved with ``save_pretrained``, BPE tokenizer trained in code) and a JSONL dataset are
written to disk; the command runs exactly as a user types it (``orthoreg.cli.main(["sft", ...])``). Asserted on what
the run leaves in ``output_dir``: the ``orthoreg/...`` metrics in ``trainer_state.json``'s log history, the saved
directions, ``orthoreg_run.json``. The two-rank runs are tests/distributed/test_sft_distributed.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orthoreg.cli import main as orthoreg_main
from tests.distributed.scripts.sft_assets import HIDDEN, write_tiny_sft_assets

# The activation projection (the defaults are OrthoRegConfig.recommended(): the reader term alone).
PROJECTION = ["--orthoreg_proj_weight", "1", "--orthoreg_reader_weight", "0", "--orthoreg_anchor_kl_weight", "0",
              "--orthoreg_units", "absolute"]
COMMON = ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--use_cpu", "--report_to", "none",
          "--disable_tqdm", "true", "--save_strategy", "no", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_sft_assets(tmp_path_factory.mktemp("sft-assets"))


def _history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def _train_logs(out: Path) -> list[dict]:
    return [entry for entry in _history(out) if "loss" in entry]


def test_builtin_directions_one_process(assets, tmp_path):
    out = tmp_path / "out"
    code = orthoreg_main(["sft", "--model_name_or_path", assets["model"], "--dataset_name", assets["data"],
                          "--output_dir", str(out), "--max_steps", "3", *COMMON, *PROJECTION,
                          "--orthoreg_layers", "1,2", "--orthoreg_cov_weight", "1e-3", "--orthoreg_mask", "labels"])
    assert code == 0
    logs = _train_logs(out)
    assert len(logs) == 3  # one log per step, each with the regulariser's terms
    for entry in logs:
        assert entry["orthoreg/proj"] > 0 and entry["orthoreg/cov"] > 0
        assert entry["orthoreg/total"] == pytest.approx(entry["orthoreg/proj"] + 1e-3 * entry["orthoreg/cov"],
                                                        rel=1e-4)
    from orthoreg import HarmfulDirections

    directions = HarmfulDirections.load(out / "harmful_directions.safetensors")
    assert directions.layers == [1, 2]  # extracted at the guarded layers only
    assert directions.hidden_size == HIDDEN
    assert directions.metadata["source_model"] == assets["model"]
    run = json.loads((out / "orthoreg_run.json").read_text())
    assert run["world_size"] == 1 and run["directions"]["source"] == "builtin"
    assert run["orthoreg"]["layers"] == [1, 2] and run["orthoreg"]["mask"] == "labels"
    assert (out / "model.safetensors").is_file()  # TRL's save_model still runs


def test_yaml_config_packing_peft_paired_anchor_and_a_directions_file(assets, tmp_path):
    from orthoreg import HarmfulDirections

    dirs_file = tmp_path / "harmful.safetensors"
    HarmfulDirections({1: torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(0))}).save(dirs_file)
    # (a save_pretrained folder or a Hub repo id works too: HarmfulDirections.from_pretrained reads all three)
    out = tmp_path / "out"
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model_name_or_path: {assets['model']}\n"
        f"dataset_name: {assets['data_file']}\n"  # one local .jsonl file (not a folder)
        f"output_dir: {out}\n"
        "max_steps: 2\n"
        "max_length: 48\n"
        "packing: true\n"
        "use_peft: true\n"
        "lora_r: 4\n"
        "lora_alpha: 8\n"
        "lora_target_modules: [o_proj, down_proj]\n"
        "orthoreg_layers: [1]\n"
        "orthoreg_anchor: paired\n"
        "orthoreg_proj_weight: 1.0\n"
        "orthoreg_reader_weight: 0.0\n"
        "orthoreg_anchor_kl_weight: 0.0\n"
        "orthoreg_units: absolute\n"
        f"orthoreg_directions: {dirs_file}\n"
    )
    # the command line overrides the YAML file, as in TRL
    code = orthoreg_main(["sft", "--config", str(config), "--max_steps", "3", *COMMON])
    assert code == 0
    logs = _train_logs(out)
    assert len(logs) == 3 and all(entry["orthoreg/proj"] >= 0 for entry in logs)
    assert any(entry["orthoreg/proj"] > 0 for entry in logs[1:])  # the adapter has moved off the base by step 2
    # packing: each step's 4 rows are packed to ~48 tokens (unpacked, 4 prompt/completion rows hold < 100 tokens)
    assert logs[0]["num_tokens"] > 150
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["down_proj", "o_proj"]
    run = json.loads((out / "orthoreg_run.json").read_text())
    assert run["orthoreg"]["anchor"] == "paired" and run["directions"] == {
        "source": "file", "file": str(dirs_file), "layers": [1], "k": 1}


def test_no_orthoreg_is_trls_plain_sft(assets, tmp_path):
    out = tmp_path / "out"
    code = orthoreg_main(["sft", "--model_name_or_path", assets["model"], "--dataset_name", assets["data"],
                          "--output_dir", str(out), "--max_steps", "1", *COMMON, "--no_orthoreg"])
    assert code == 0
    assert not any(k.startswith("orthoreg/") for entry in _history(out) for k in entry)
    assert not (out / "harmful_directions.safetensors").exists()


@pytest.mark.parametrize("flags,match", [
    (["--orthoreg_layers", "middle"], "unknown layer selection 'middle'"),
    ([*PROJECTION, "--orthoreg_directions", "/no/such/harmful.safetensors"],
     "neither 'builtin', an existing file or folder"),
    ([*PROJECTION, "--orthoreg_anchor", "paired"], "needs --use_peft"),
    (["--orthoreg_lora_weight", "0.5"], "OrthoLoRA"),
    (["--orthoreg_proj_weight", "-1"], "`proj_weight` must be a finite number >= 0"),
])
def test_bad_orthoreg_flags_fail_before_anything_loads(flags, match, tmp_path, capsys):
    out = tmp_path / "out"
    code = orthoreg_main(["sft", "--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", "x",
                          "--output_dir", str(out), "--use_cpu", *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("orthoreg sft: error:") and match in err
    assert not out.exists()


def test_help_lists_trls_flags_and_orthoregs(capsys):
    from orthoreg.sft import make_parser

    text = make_parser(prog="orthoreg sft").format_help()
    for flag in ("--packing", "--use_peft", "--lora_r", "--dataset_name", "--max_length", "--orthoreg_layers",
                 "--orthoreg_directions", "--orthoreg_proj_weight", "--orthoreg_anchor", "--no_orthoreg"):
        assert flag in text, flag
    assert "{absolute,base_mean,paired}" in text
    with pytest.raises(SystemExit):
        orthoreg_main(["--help"])
    assert "sft" in capsys.readouterr().out


def test_directions_from_a_save_pretrained_folder(assets, tmp_path):
    from orthoreg import HarmfulDirections

    folder = tmp_path / "harmful-directions"
    HarmfulDirections({2: torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(1))}).save_pretrained(folder)
    out = tmp_path / "out"
    code = orthoreg_main(["sft", "--model_name_or_path", assets["model"], "--dataset_name", assets["data"],
                          "--output_dir", str(out), "--max_steps", "1", *COMMON, *PROJECTION, "--orthoreg_layers",
                          "-1", "--orthoreg_directions", str(folder)])
    assert code == 0
    assert json.loads((out / "orthoreg_run.json").read_text())["directions"]["layers"] == [2]
    assert "orthoreg/proj" in _train_logs(out)[0]


def test_recommended_base_units_and_the_reader_term(assets, tmp_path):
    """The README's recommended setting (base units, λ 0.1) and the reader penalty from a subspaces file."""
    from transformers import AutoModelForCausalLM

    from orthoreg.reader import InputSubspaces

    model = AutoModelForCausalLM.from_pretrained(assets["model"])
    g = torch.Generator().manual_seed(0)
    spaces = InputSubspaces({name: torch.randn(2, module.in_features, generator=g)
                             for name, module in model.named_modules() if name.endswith("mlp.up_proj")})
    spaces.save(tmp_path / "spaces.safetensors")
    out = tmp_path / "out"
    code = orthoreg_main(["sft", "--model_name_or_path", assets["model"], "--dataset_name", assets["data"],
                          "--output_dir", str(out), "--max_steps", "2", *COMMON, "--orthoreg_layers", "1,2",
                          "--orthoreg_units", "base", "--orthoreg_proj_weight", "0.1", "--orthoreg_reader_weight",
                          "1.0", "--orthoreg_input_subspaces", str(tmp_path / "spaces.safetensors")])
    assert code == 0
    first, second = _train_logs(out)
    assert first["orthoreg/proj"] == pytest.approx(1.0, rel=1e-4)  # base units: 1 on the calibration batch
    assert first["orthoreg/reader"] == 0.0 and second["orthoreg/reader"] > 0  # full FT: W = W₀ at step 0
    run = json.loads((out / "orthoreg_run.json").read_text())
    assert run["orthoreg"]["units"] == "base" and run["input_subspaces"].endswith("spaces.safetensors")


def test_missing_input_subspaces_fail_before_anything_loads(tmp_path, capsys):
    code = orthoreg_main(["sft", "--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", "x",
                          "--output_dir", str(tmp_path / "out"), "--use_cpu", "--orthoreg_input_subspaces",
                          str(tmp_path / "no-such-subspaces")])
    assert code == 2 and "--orthoreg_input_subspaces" in capsys.readouterr().err


@pytest.mark.parametrize("peft", [False, True])
def test_no_orthoreg_flag_runs_the_recommended_setting(assets, tmp_path, peft):
    """No --orthoreg_* flag: the template-reader constraint, V_m recorded from the built-in prompts at train start."""
    from orthoreg import InputSubspaces

    out = tmp_path / "out"
    lora = ["--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "down_proj"] if peft else []
    code = orthoreg_main(["sft", "--model_name_or_path", assets["model"], "--dataset_name", assets["data"],
                          "--output_dir", str(out), "--max_steps", "2", *COMMON, *lora])
    assert code == 0
    first, second = _train_logs(out)
    assert first["orthoreg/reader"] == 0.0 and second["orthoreg/reader"] > 0  # ΔW = 0 before the first update
    assert "orthoreg/proj" not in first
    run = json.loads((out / "orthoreg_run.json").read_text())
    assert run["orthoreg"]["units"] == "base" and run["input_subspaces"] == "builtin"
    assert run["directions"] == {"source": None}  # no harmful directions needed
    subspaces = InputSubspaces.from_pretrained(out / "orthoreg_input_subspaces")
    leaves = {n.rsplit(".", 1)[-1] for n in subspaces.names}
    assert leaves == ({"q_proj", "down_proj"} if peft else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"})
    assert not any(n.startswith("model.layers.0.") for n in subspaces.names)


def test_a_missing_local_dataset_is_named_before_anything_loads(tmp_path, capsys):
    code = orthoreg_main(["sft", "--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name",
                          str(tmp_path / "task.jsonl"), "--output_dir", str(tmp_path / "out"), "--use_cpu"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
