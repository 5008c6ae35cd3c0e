"""The CLI's input/output handling: output paths refused before any heavy work, the directions folder form, the
unknown-token warning, ``--revision``/``--trust-remote-code`` passthrough and ``--dtype auto`` as in transformers."""

import argparse
import json
import os

import pytest
import torch
import transformers

from orthoreg.commands import _common
from orthoreg.commands import audit as audit_cmd
from orthoreg.commands import directions as directions_cmd
from orthoreg.directions.harmful import CARD_NAME, WEIGHTS_NAME, HarmfulDirections
from tests._directions_helpers import (  # noqa: F401 - one_torch_thread is an autouse fixture
    SIMPLE_TEMPLATE,
    make_tokenizer,
    one_torch_thread,
    planted_model,
    planted_prompts,
    run_subcommand,
    save_planted_assets,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny planted model + chat tokenizer on disk, a paired prompt file and a task file."""
    return save_planted_assets(tmp_path_factory.mktemp("cli"),
                               [{"prompt": "please explain h1", "completion": "the thing now"}], categories=False)


_cli = run_subcommand


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if a command gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before checking its output paths")

    monkeypatch.setattr(directions_cmd, "load_model", refuse)
    monkeypatch.setattr(audit_cmd, "load_model", refuse)


def _extract(saved, out, *extra):
    return ["directions", "extract", "--model", str(saved / "model"), "--out", str(out), "--prompts",
            str(saved / "pairs.jsonl"), "--split", "all", "--layers", "1", "--quiet", *extra]


# ----------------------------------------------------------------------------------------------- output paths


@pytest.mark.parametrize(
    "out, match",
    [
        ("missing/dir/x.safetensors", r"the folder '.*missing/dir' does not exist; create it first \(mkdir -p"),
        ("afile/sub/folder", r"cannot create the --out folder .*'.*afile' is a file"),
        ("afile", r"the --out folder '.*afile' is a file"),
        ("adir.safetensors", r"'.*adir.safetensors' is a folder; give a file name"),
    ],
)
def test_extract_refuses_bad_outputs_before_loading_the_model(saved, tmp_path, capsys, no_model_loading, out,
                                                              match):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.safetensors").mkdir()
    assert _cli(directions_cmd, _extract(saved, tmp_path / out)) == 2
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(OSError, match=match):
        directions_cmd.check_output(str(tmp_path / out))


def test_unwritable_output_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: nothing to refuse then
            return
        with pytest.raises(PermissionError, match="is not writable"):
            directions_cmd.check_output(str(locked / "x.safetensors"))
        with pytest.raises(PermissionError, match="is not writable"):
            directions_cmd.check_output(str(locked / "new" / "folder"))
    finally:
        locked.chmod(0o700)


def test_audit_refuses_bad_outputs_before_loading_the_model(saved, tmp_path, capsys, no_model_loading):
    HarmfulDirections({1: torch.randn(1, 32)}).save(tmp_path / "d.safetensors")
    base = ["audit", "--model", str(saved / "model"), "--data", str(saved / "task.jsonl"), "--directions",
            str(tmp_path / "d.safetensors"), "--quiet"]
    (tmp_path / "afile").write_text("x")
    assert _cli(audit_cmd, [*base, "--out", str(tmp_path / "afile")]) == 2
    assert "--out folder" in capsys.readouterr().err
    (tmp_path / "out" / "overlap.png").mkdir(parents=True)
    assert _cli(audit_cmd, [*base, "--out", str(tmp_path / "out")]) == 2
    assert "overlap.png' is a folder; the audit writes a file there" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- folder form


def test_extract_to_a_folder_then_show_and_audit_it(saved, tmp_path, capsys):
    folder = tmp_path / "new" / "harmful-directions"
    assert _cli(directions_cmd, _extract(saved, folder)) == 0
    assert sorted(os.listdir(folder)) == [WEIGHTS_NAME, CARD_NAME]
    card = json.loads((folder / CARD_NAME).read_text())
    assert card["source_model"] == str(saved / "model") and card["layers"] == [1] and card["method"] == "diff_means"
    capsys.readouterr()
    assert _cli(directions_cmd, ["directions", "show", str(folder)]) == 0
    assert "layers: [1]" in capsys.readouterr().out
    rc = _cli(audit_cmd, ["audit", "--model", str(saved / "model"), "--data", str(saved / "task.jsonl"),
                          "--directions", str(folder), "--out", str(tmp_path / "audit"), "--quiet", "--no-recommend"])
    assert rc == 0 and (tmp_path / "audit" / "overlap.json").is_file()


# ----------------------------------------------------------------------------------------------- unknown tokens


def test_extract_warns_once_when_prompts_are_mostly_unknown(saved, tmp_path, capsys):
    harmful, harmless, _ = planted_prompts(6)
    with open(tmp_path / "foreign.jsonl", "w") as fh:
        for h, b in zip(harmful, harmless, strict=True):
            fh.write(json.dumps({"harmful": f"{h} zzz yyy xxx", "harmless": f"{b} zzz yyy xxx"}) + "\n")
    argv = ["directions", "extract", "--model", str(saved / "model"), "--out", str(tmp_path / "d.safetensors"),
            "--prompts", str(tmp_path / "foreign.jsonl"), "--layers", "1", "--quiet"]
    assert _cli(directions_cmd, argv) == 0
    err = capsys.readouterr().err
    assert err.count("are unknown to the tokenizer ('[UNK]')") == 1 and err.startswith("warning: ")
    assert _cli(directions_cmd, _extract(saved, tmp_path / "e.safetensors")) == 0
    assert "unknown to the tokenizer" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- model flags


def test_revision_and_trust_remote_code_reach_both_from_pretrained(saved, monkeypatch):
    seen = {}
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def model_spy(path, **kwargs):
        seen["model"] = kwargs
        return real_model(path, **{k: v for k, v in kwargs.items() if k not in ("revision", "trust_remote_code")})

    def tok_spy(path, **kwargs):
        seen["tokenizer"] = kwargs
        return real_tok(path)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_spy)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_spy)
    parser = argparse.ArgumentParser()
    _common.add_model_flags(parser)
    defaults = parser.parse_args([])
    assert defaults.trust_remote_code is False and defaults.revision is None and defaults.dtype == "auto"
    args = parser.parse_args(["--revision", "v1.2", "--trust-remote-code"])
    _common.load_model(str(saved / "model"), device="cpu", dtype=args.dtype, revision=args.revision,
                       trust_remote_code=args.trust_remote_code)
    for which in ("model", "tokenizer"):
        assert seen[which]["revision"] == "v1.2" and seen[which]["trust_remote_code"] is True
    assert seen["model"]["dtype"] == "auto" and seen["model"]["use_safetensors"] is True
    _common.load_model(str(saved / "model"), device="cpu")
    assert seen["model"]["trust_remote_code"] is False and seen["tokenizer"]["trust_remote_code"] is False


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16")
    model, _ = planted_model(1)
    model.to(torch.bfloat16).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype, expected", [("auto", torch.bfloat16), ("float32", torch.float32),
                                             ("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_dtype_auto_is_the_checkpoints_dtype(bf16_model, dtype, expected):
    # A bfloat16 checkpoint on a CPU: "auto" keeps bfloat16, as transformers' from_pretrained(dtype="auto") does
    # (before, "auto" meant "bfloat16 on a GPU, else float32" and loaded this checkpoint as float32).
    model, _ = _common.load_model(str(bf16_model), device="cpu", dtype=dtype, tokenizer=False)
    assert {p.dtype for p in model.parameters()} == {expected}


# ----------------------------------------------------------------------------------------------- subspaces


def test_subspaces_extract_then_show(saved, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orthoreg.commands import subspaces as subspaces_cmd
    from orthoreg.reader import InputSubspaces, extract_template_subspaces

    harmless = planted_prompts(4)[1]
    (tmp_path / "prompts.txt").write_text("\n".join(harmless) + "\n")
    out = tmp_path / "v"
    assert _cli(subspaces_cmd, ["subspaces", "extract", "--model", str(saved / "model"), "--out", str(out),
                                "--prompts", str(tmp_path / "prompts.txt"), "--k", "2", "--targets",
                                "up_proj,o_proj", "--quiet"]) == 0
    got = InputSubspaces.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(saved / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(saved / "model")
    want = extract_template_subspaces(model, tokenizer, harmless, k=2, targets=["up_proj", "o_proj"])
    assert got.names == want.names and all(n.rsplit(".", 1)[-1] in ("up_proj", "o_proj") for n in got.names)
    assert not any(n.startswith("model.layers.0.") for n in got.names)  # layer 0 is left out
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in got.names)
    assert got.metadata["source_model"] == str(saved / "model") and got.k == 2
    capsys.readouterr()
    assert _cli(subspaces_cmd, ["subspaces", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"modules: {len(got)}, k: 2" in shown and got.names[0] in shown


def test_subspaces_extract_names_bad_input(saved, tmp_path, capsys, monkeypatch):
    from orthoreg.commands import subspaces as subspaces_cmd

    monkeypatch.setattr(subspaces_cmd, "load_model", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the command loaded a model before checking its output path")))
    (tmp_path / "afile").write_text("x")
    assert _cli(subspaces_cmd, ["subspaces", "extract", "--model", str(saved / "model"), "--out",
                                str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    monkeypatch.undo()
    plain = tmp_path / "plain-model"  # the same model, its tokenizer without a chat template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(saved / "model").save_pretrained(plain)
    tokenizer = AutoTokenizer.from_pretrained(saved / "model")
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    assert _cli(subspaces_cmd, ["subspaces", "extract", "--model", str(plain), "--out", str(tmp_path / "v2"),
                                "--quiet"]) == 2
    assert "no chat template" in capsys.readouterr().err
