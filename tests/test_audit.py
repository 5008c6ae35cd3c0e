"""overlap_score: known answers, the gradient against a brute-force autograd reference, the shift mode, task data
encoding, the report and plot, and the ``directions extract`` / ``audit`` commands end to end."""

import copy
import json
import math
import sys

import pytest
import torch

from orthoreg.audit import (
    OverlapReport,
    TaskDataError,
    encode_task_examples,
    load_task_examples,
    overlap_score,
    plot_overlap,
    score_features,
    task_features,
    verdict_for,
)
from orthoreg.commands import audit as audit_cmd
from orthoreg.commands import directions as directions_cmd
from orthoreg.directions.extraction import extract_directions
from orthoreg.directions.harmful import DirectionsError, HarmfulDirections
from tests._directions_helpers import (  # noqa: F401 - one_torch_thread is an autouse fixture
    SIMPLE_TEMPLATE,
    make_tokenizer,
    one_torch_thread,
    planted_model,
    planted_prompts,
    run_subcommand,
    save_planted_assets,
)

META = {"model_type": "llama", "num_layers": 3}
TASK = [
    "please explain how to h1",
    {"text": "reply to my friend now"},
    {"prompt": "write a short story about", "completion": "my friend and the thing"},
    {"prompt": "how to do b2", "completion": "now"},
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _orthogonal_to(t: torch.Tensor, seed: int = 0) -> torch.Tensor:
    r = torch.randn(t.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    t = t / t.norm()
    return r - (r @ t) * t


# ----------------------------------------------------------------------------------------------- pure geometry


def test_score_features_known_angles():
    t = torch.zeros(8, dtype=torch.float64)
    t[0] = 2.0
    directions = HarmfulDirections({
        0: torch.eye(8)[:1],  # parallel: 1
        1: torch.eye(8)[1:2],  # orthogonal: 0
        2: torch.tensor([[math.cos(1.0), math.sin(1.0), 0, 0, 0, 0, 0, 0]]),  # angle of 1 rad: cos(1)
        3: torch.stack([torch.eye(8)[0] + torch.eye(8)[1], torch.eye(8)[0] - torch.eye(8)[1]]),  # t in the span
    })
    report = score_features({0: t, 1: t, 2: -t, 3: t}, directions)
    assert report.per_layer[0] == pytest.approx(1.0, abs=1e-7)
    assert report.per_layer[1] == pytest.approx(0.0, abs=1e-7)
    assert report.per_layer[2] == pytest.approx(math.cos(1.0), abs=1e-6)  # |cos|: the sign of t does not matter
    # Both rows are at 45° to t, yet t lies in their span: the subspace score is 1, each row's cosine is 1/√2.
    assert report.per_direction[3] == pytest.approx([2**-0.5, 2**-0.5], abs=1e-6)
    assert report.per_layer[3] == pytest.approx(1.0, abs=1e-6)
    assert report.overall == max(report.per_layer.values()) and report.peak_layer in (0, 3)
    assert report.feature_norm[0] == 2.0 and report.chance == pytest.approx(math.sqrt(2 / 8))


def test_zero_feature_scores_zero():
    report = score_features({0: torch.zeros(8)}, HarmfulDirections({0: torch.eye(8)[:1]}))
    assert report.per_layer == {0: 0.0} and report.verdict == "low" and report.feature_norm[0] == 0.0


@pytest.mark.parametrize("score, verdict", [(0.0, "low"), (0.0999, "low"), (0.1, "elevated"), (0.2999, "elevated"),
                                            (0.3, "high"), (1.0, "high")])
def test_verdict_thresholds(score, verdict):
    assert verdict_for(score) == verdict


def test_bad_thresholds_and_layers_are_refused():
    directions = HarmfulDirections({0: torch.eye(8)[:1]})
    with pytest.raises(ValueError, match="0 < low <= high <= 1"):
        score_features({0: torch.ones(8)}, directions, thresholds=(0.5, 0.2))
    with pytest.raises(ValueError, match="no harmful directions for layer 1"):
        score_features({1: torch.ones(8)}, directions)


# ----------------------------------------------------------------------------------------------- gradient mode


def test_task_gradient_matches_brute_force_autograd(tok):
    # Reference: the whole data set as one padded batch, HF's own loss, grads of output_hidden_states[ℓ + 1]
    # (= output of layer ℓ for ℓ < L − 1), averaged over non-padding tokens. Streaming in batches of 1 and 3 must
    # reproduce it (float32 forward/backward: observed relative error ~3e-7; bound 1e-5).
    model, _ = planted_model(1)
    encoded = encode_task_examples(tok, TASK)
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.zeros(len(encoded), width, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100)
    mask = torch.zeros(len(encoded), width, dtype=torch.long)
    for row, (i, lab) in enumerate(encoded):
        ids[row, : len(i)], labels[row, : len(i)], mask[row, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    grads = torch.autograd.grad(out.loss, [out.hidden_states[1], out.hidden_states[2]])
    reference = {layer: -g[mask.bool()].double().mean(dim=0) for layer, g in zip((0, 1), grads, strict=True)}
    for batch_size in (1, 3):
        features, n_examples, n_tokens = task_features(model, tok, TASK, [0, 1], batch_size=batch_size,
                                                       progress=False)
        assert n_examples == 4 and n_tokens == int(mask.sum())
        for layer, want in reference.items():
            assert (features[layer] - want).norm() / want.norm() < 1e-5


@pytest.mark.parametrize("k", [1, 3])
def test_gradient_parallel_and_orthogonal_known_answers(tok, k):
    model, _ = planted_model(1)
    features, _, _ = task_features(model, tok, TASK, [0, 1, 2], progress=False)
    parallel, orthogonal = {}, {}
    for layer, t in features.items():
        others = [_orthogonal_to(t, seed=s) for s in range(k - 1)]
        parallel[layer] = torch.stack([t, *others]).float()  # t is one of the k directions
        ortho = torch.stack([_orthogonal_to(t, seed=10 + s) for s in range(k)])
        ortho = ortho - (ortho @ (t / t.norm())).unsqueeze(1) * (t / t.norm())  # keep every row exactly ⊥ t
        orthogonal[layer] = ortho.float()
    high = overlap_score(model, HarmfulDirections(parallel, metadata=META), TASK, tok, progress=False)
    low = overlap_score(model, HarmfulDirections(orthogonal, metadata=META), TASK, tok, progress=False)
    assert high.mode == "gradient" and high.overall > 0.999 and high.verdict == "high"
    assert all(score > 0.999 for score in high.per_layer.values())
    assert low.overall < 1e-3 and low.verdict == "low"


def test_labels_mask_and_guarded_layers(tok):
    model, _ = planted_model(1)
    directions = HarmfulDirections({i: torch.eye(32)[:1] for i in range(3)}, metadata=META)
    every = overlap_score(model, directions, TASK, tok, progress=False)
    labelled = overlap_score(model, directions, TASK, tok, mask="labels", progress=False)
    assert labelled.n_tokens < every.n_tokens
    assert every.guarded_layers == [1], "OrthoRegConfig's default 'middle_third' of 3 layers"
    assert overlap_score(model, directions, TASK, tok, guarded_layers="last_third", layers=[1, 2],
                         progress=False).guarded_layers == [2]
    with pytest.raises(ValueError, match=r"no harmful directions for layers \[1, 2\]"):
        overlap_score(model, HarmfulDirections({0: torch.eye(32)[:1]}, metadata=META), TASK, tok, layers="all",
                      progress=False)


def test_model_state_is_restored(tok):
    model, _ = planted_model(1)
    model.train()
    overlap_score(model, HarmfulDirections({0: torch.eye(32)[:1]}, metadata=META), TASK, tok, progress=False)
    assert model.training
    assert all(len(layer._forward_hooks) == 0 for layer in model.model.layers)
    assert all(p.grad is None for p in model.parameters()), "only activation gradients are computed"


# ----------------------------------------------------------------------------------------------- shift mode


def test_activation_shift_known_answers(tok):
    # The "fine-tuned" model adds 0.5·w to layer 0's output: the shift at layer 0 is exactly 0.5·w.
    model, _ = planted_model(1)
    tuned = copy.deepcopy(model)
    w = torch.randn(32, generator=torch.Generator().manual_seed(3))
    tuned.model.layers[0].register_forward_hook(lambda module, args, output: output + 0.5 * w)
    along = overlap_score(model, HarmfulDirections({0: w}, metadata=META), TASK, tok, finetuned=tuned,
                          progress=False)
    across = overlap_score(model, HarmfulDirections({0: _orthogonal_to(w.double()).float()}, metadata=META), TASK,
                           tok, finetuned=tuned, progress=False)
    assert along.mode == "shift" and along.per_layer[0] == pytest.approx(1.0, abs=1e-6)
    assert along.feature_norm[0] == pytest.approx(0.5 * float(w.norm()), rel=1e-5)
    assert across.per_layer[0] < 1e-5


def test_identical_models_have_no_shift(tok):
    model, _ = planted_model(1)
    report = overlap_score(model, HarmfulDirections({1: torch.eye(32)[:1]}, metadata=META), TASK, tok,
                           finetuned=copy.deepcopy(model), progress=False)
    assert report.feature_norm == {1: 0.0} and report.overall == 0.0 and report.verdict == "low"


def test_directions_from_another_model_are_refused(tok):
    model, _ = planted_model(1)
    with pytest.raises(DirectionsError, match="hidden size is 32"):
        overlap_score(model, HarmfulDirections({0: torch.eye(48)[:1]}), TASK, tok, progress=False)
    wide, _ = planted_model(1, hidden_size=48)
    with pytest.raises(DirectionsError, match="hidden size is 48"):
        overlap_score(model, HarmfulDirections({0: torch.eye(32)[:1]}), TASK, tok, finetuned=wide, progress=False)


# ----------------------------------------------------------------------------------------------- task data


def test_encoding_layouts_and_labels(tok):
    text, completion, pretokenized = encode_task_examples(
        tok, ["please explain", {"prompt": "please explain", "completion": "the thing"},
              {"input_ids": [2, 4, 5], "labels": [-100, 4, 5]}])
    assert text[1] == text[0]
    assert completion[0] == tok("please explain the thing")["input_ids"]
    assert completion[1] == [-100, -100, -100] + completion[0][3:], "loss on the completion only"
    assert pretokenized == ([2, 4, 5], [-100, 4, 5])


def test_messages_label_only_assistant_turns():
    tok = make_tokenizer(chat_template=SIMPLE_TEMPLATE)
    messages = [{"role": "user", "content": "please explain"}, {"role": "assistant", "content": "the thing"}]
    [(ids, labels)] = encode_task_examples(tok, [{"messages": messages}])
    words = tok.convert_ids_to_tokens(ids)
    assert words == ["user", ":", "please", "explain", "assistant", ":", "the", "thing"]
    assert [w for w, lab in zip(words, labels, strict=True) if lab != -100] == ["the", "thing"]
    # Conversational prompt/completion (TRL's layout) labels the completion turn only: the same result.
    assert encode_task_examples(tok, [{"prompt": messages[:1], "completion": messages[1:]}]) == [(ids, labels)]
    with pytest.raises(TaskDataError, match="no chat template"):
        encode_task_examples(make_tokenizer(), [{"messages": messages}])


@pytest.mark.parametrize(
    "examples, tokenizer, match",
    [
        ([{"question": "x"}], True, "no usable layout"),
        (["please explain"], False, "need a tokenizer"),
        ([{"input_ids": [1, 2], "labels": [1]}], False, "2 input_ids but 1 labels"),
        ([{"input_ids": []}], False, "holds no tokens"),
    ],
)
def test_task_data_refusals(tok, examples, tokenizer, match):
    with pytest.raises(TaskDataError, match=match):
        encode_task_examples(tok if tokenizer else None, examples)


def test_no_labelled_token_is_refused(tok):
    model, _ = planted_model(1)
    directions = HarmfulDirections({0: torch.eye(32)[:1]}, metadata=META)
    with pytest.raises(TaskDataError, match="no task token carries a label"):
        overlap_score(model, directions, [{"input_ids": [2, 4, 5], "labels": [-100] * 3}], progress=False)


def test_long_examples_are_truncated_with_a_warning(tok):
    with pytest.warns(UserWarning, match="kept the first 3"):
        [(ids, _)] = encode_task_examples(tok, ["please explain how to do the thing"], max_length=3)
    assert len(ids) == 3


def test_load_task_examples(tmp_path):
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": f"ex {i}"}) for i in range(5)))
    assert len(load_task_examples(tmp_path / "t.jsonl", limit=2)) == 2
    (tmp_path / "t.txt").write_text("one\ntwo\n")
    assert load_task_examples(tmp_path / "t.txt") == [{"text": "one"}, {"text": "two"}]
    with pytest.raises(FileNotFoundError, match="no task data file"):
        load_task_examples(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(TaskDataError, match="bad.jsonl:1 is not valid JSON"):
        load_task_examples(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskDataError, match="holds no examples"):
        load_task_examples(tmp_path / "empty.jsonl")


def test_task_examples_from_csv_parquet_and_a_hub_dataset(tmp_path, monkeypatch):
    import datasets

    rows = [{"prompt": "w5 w6", "completion": "w7"}, {"prompt": "w8", "completion": "w9 w10"}]
    (tmp_path / "t.csv").write_text("prompt,completion\nw5 w6,w7\nw8,w9 w10\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    assert load_task_examples(tmp_path / "t.csv") == rows
    assert load_task_examples(tmp_path / "t.parquet") == rows

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_task_examples("org/task", split="validation", limit=1) == rows[:1]
    assert calls == [("org/task", None, "validation")]


def test_unreachable_hub_task_data_names_the_fix(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TaskDataError, match=r"could not load the dataset 'org/task'.*offline mode is on.*local "
                                            r"JSONL/CSV/Parquet file"):
        load_task_examples("org/task")


# ----------------------------------------------------------------------------------------------- report and plot


def _report() -> OverlapReport:
    return score_features({0: torch.ones(8), 1: torch.eye(8)[2]}, HarmfulDirections({0: torch.eye(8)[:1],
                                                                                      1: torch.eye(8)[:2]}),
                          guarded_layers=[1], n_examples=3, n_tokens=30)


def test_report_json_round_trip(tmp_path):
    report = _report()
    report.save_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["per_layer"] == {"0": pytest.approx(8**-0.5), "1": 0.0} and data["verdict"] == "high"
    assert OverlapReport.from_dict(data) == report
    assert "verdict: HIGH" in report.verdict_line() and "low < 0.1 <= elevated < 0.3 <= high" in \
        report.verdict_line()
    assert report.table().splitlines()[2].rstrip().endswith("*")


def test_plot_writes_a_png(tmp_path):
    path = plot_overlap(_report(), tmp_path / "overlap.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_overlap(_report(), tmp_path / "overlap.png")


# ----------------------------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny planted model + chat tokenizer on disk, a paired prompt file and a task file."""
    rows = [e if isinstance(e, dict) else {"text": e} for e in TASK[1:]] + [
        {"messages": [{"role": "user", "content": "reply to my friend"},
                      {"role": "assistant", "content": "the thing now"}]}]
    return save_planted_assets(tmp_path_factory.mktemp("cli"), rows)


_cli = run_subcommand


def test_directions_extract_and_show_commands(saved, capsys):
    out = saved / "harmful.safetensors"
    rc = _cli(directions_cmd, ["directions", "extract", "--model", str(saved / "model"), "--out", str(out),
                               "--prompts", str(saved / "pairs.jsonl"), "--split", "all", "--k", "2",
                               "--layers", "0,2", "--pooling", "mean", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "method=pca_diff" in printed and "d_prime" in printed and f"wrote {out}" in printed
    dirs = HarmfulDirections.load(out)
    assert dirs.layers == [0, 2] and dirs.k == 2 and dirs.metadata["chat_template"] is True
    assert _cli(directions_cmd, ["directions", "show", str(out)]) == 0
    assert "layers: [0, 2]" in capsys.readouterr().out


def test_directions_extract_from_two_files(saved, tmp_path, capsys):
    harmful, harmless, _ = planted_prompts(3)
    (tmp_path / "h.txt").write_text("\n".join(harmful))
    (tmp_path / "b.txt").write_text("\n".join(harmless[:-6]))  # 18 vs 12: ratio 1.5 > 1.25
    argv = ["directions", "extract", "--model", str(saved / "model"), "--out", str(tmp_path / "d.safetensors"),
            "--harmful-file", str(tmp_path / "h.txt"), "--harmless-file", str(tmp_path / "b.txt"), "--quiet"]
    assert _cli(directions_cmd, argv) == 2
    assert "unbalanced contrast set" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="keeping the first 12 of each"):
        assert _cli(directions_cmd, argv + ["--balance", "truncate", "--no-chat-template"]) == 0
    assert HarmfulDirections.load(tmp_path / "d.safetensors").metadata["chat_template"] is False


def test_audit_command_end_to_end(saved, tmp_path, capsys):
    directions = saved / "audit-dirs.safetensors"
    assert _cli(directions_cmd, ["directions", "extract", "--model", str(saved / "model"), "--out",
                                 str(directions), "--prompts", str(saved / "pairs.jsonl"), "--quiet"]) == 0
    out = tmp_path / "report"
    rc = _cli(audit_cmd, ["audit", "--model", str(saved / "model"), "--data", str(saved / "task.jsonl"),
                          "--directions", str(directions), "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    data = json.loads((out / "overlap.json").read_text())
    assert set(data["per_layer"]) == {"0", "1", "2"} and data["mode"] == "gradient" and data["n_examples"] == 4
    assert 0 <= data["overall"] <= 1 and data["verdict"] in ("low", "elevated", "high")
    assert data["guarded_layers"] == [1] and data["info"]["data"] == str(saved / "task.jsonl")
    assert (out / "overlap.png").read_bytes()[:4] == b"\x89PNG"
    assert "layer" in printed and "overlap" in printed
    assert printed.strip().splitlines()[-1].startswith("verdict: ")

    # --fail-on turns a verdict into an exit status (thresholds chosen so the verdict is "high").
    rc = _cli(audit_cmd, ["audit", "--model", str(saved / "model"), "--data", str(saved / "task.jsonl"),
                          "--directions", str(directions), "--out", str(out), "--quiet",
                          "--thresholds", "0.0001", "0.0002", "--fail-on", "high"])
    assert rc == 1 and "verdict: HIGH" in capsys.readouterr().out


def test_audit_command_shift_mode(saved, tmp_path):
    tuned, _ = planted_model(1)
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight.add_(0.01)
    tuned.save_pretrained(tmp_path / "tuned")
    HarmfulDirections({1: torch.eye(32)[:2]}, metadata=META).save(tmp_path / "d.safetensors")
    rc = _cli(audit_cmd, ["audit", "--model", str(saved / "model"), "--finetuned", str(tmp_path / "tuned"),
                          "--data", str(saved / "task.jsonl"), "--directions", str(tmp_path / "d.safetensors"),
                          "--out", str(tmp_path / "r"), "--quiet"])
    data = json.loads((tmp_path / "r" / "overlap.json").read_text())
    assert rc == 0 and data["mode"] == "shift" and data["feature_norm"]["1"] > 0


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda p: HarmfulDirections({0: torch.eye(48)[:1]}).save(p), "hidden size is 32"),
        (lambda p: p.write_bytes(b"not a safetensors file at all"), "not a readable safetensors file"),
        (lambda p: None, "no directions file"),
    ],
)
def test_audit_command_refusals(saved, tmp_path, capsys, setup, match):
    path = tmp_path / "d.safetensors"
    setup(path)
    rc = _cli(audit_cmd, ["audit", "--model", str(saved / "model"), "--data", str(saved / "task.jsonl"),
                          "--directions", str(path), "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: ") and match in err
    assert not (tmp_path / "r").exists(), "nothing written on failure"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "phi3", "gpt2", "gpt_neox"])
def test_extract_and_audit_every_family(tok, family):
    # Decoder blocks return a tensor (Llama family) or a tuple (GPT-2, GPT-NeoX); hooks must handle both, including
    # the gradient hook that replaces the first scored layer's output.
    from tests.models import tiny_model

    model = tiny_model(family).eval()
    harmful, harmless, _ = planted_prompts(3)
    dirs = extract_directions(model, tok, harmful, harmless, k=2, method="pca_diff", progress=False)
    assert dirs.layers == [0, 1, 2] and dirs.metadata["model_type"] == model.config.model_type
    report = overlap_score(model, dirs, TASK, tok, progress=False)
    assert set(report.per_layer) == {0, 1, 2} and all(n > 0 for n in report.feature_norm.values())
    features, _, _ = task_features(model, tok, TASK, [1], progress=False)
    parallel = HarmfulDirections({1: features[1].float()}, metadata=dirs.metadata)
    assert overlap_score(model, parallel, TASK, tok, progress=False).overall > 0.999
