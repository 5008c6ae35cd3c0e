"""The defence benchmark of issue 15 (``orthoreg.realbench.defences``, ``defence_subspaces``,
``scripts/bench_defences.py``): the controls' yardstick, the arms' wiring and the driver on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from orthoreg.realbench.defence_subspaces import gradient_norm, load_adapter, random_subspaces, save_adapter
from orthoreg.realbench.defences import ARMS, DefenceJob, reader_set
from tests._scripts import load_script


def _frame(k: int, d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T.to(torch.float32)


def test_gradient_norm_matches_the_closed_form_gradient_in_float64():
    from orthoreg import InputSubspaces

    g = torch.Generator().manual_seed(0)
    adapter, frames = {}, {}
    for i, (d_in, d_out) in enumerate([(12, 7), (9, 12)]):
        a, b = torch.randn(4, d_in, generator=g), torch.randn(d_out, 4, generator=g)
        adapter[f"model.layers.{i}.mlp.up_proj"] = (a, b, 0.5 + i)
        frames[f"model.layers.{i}.mlp.up_proj"] = _frame(3, d_in, i)
    # P = s²‖B A Vᵀ‖²: ∂P/∂B = 2s² B M Mᵀ, ∂P/∂A = 2s² Bᵀ B M V with M = A Vᵀ
    squared = 0.0
    for name, (a, b, s) in adapter.items():
        a, b, v = a.double(), b.double(), frames[name].double()
        m = a @ v.T
        squared += float((2 * s * s * b @ m @ m.T).pow(2).sum() + (2 * s * s * b.T @ b @ m @ v).pow(2).sum())
    assert gradient_norm(adapter, InputSubspaces(frames)) == pytest.approx(squared ** 0.5, rel=1e-6)


def test_random_subspaces_are_orthonormal_seeded_and_shaped_like_the_method():
    from orthoreg import InputSubspaces

    like = InputSubspaces({"model.layers.0.self_attn.q_proj": _frame(5, 20, 0), "model.layers.0.mlp.down_proj":
                           _frame(5, 30, 1)})
    one, two, other = random_subspaces(like, seed=3), random_subspaces(like, seed=3), random_subspaces(like, seed=4)
    for name, v in like.items():
        r = one[name]
        assert r.shape == v.shape
        torch.testing.assert_close(r.double() @ r.double().T, torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)
        assert torch.equal(r, two[name]) and not torch.allclose(r, other[name])


def test_adapter_file_round_trip(tmp_path):
    adapter = {"model.layers.0.mlp.up_proj": (torch.randn(2, 6), torch.randn(5, 2), 2.0)}
    save_adapter(adapter, tmp_path / "a.safetensors")
    back = load_adapter(tmp_path / "a.safetensors")
    a, b, s = back["model.layers.0.mlp.up_proj"]
    assert torch.equal(a, adapter["model.layers.0.mlp.up_proj"][0]) and torch.equal(b, adapter[
        "model.layers.0.mlp.up_proj"][1]) and s == 2.0


def test_frozen_base_gives_back_the_base_weights_and_restores_the_trained_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    from orthoreg.realbench.finetune import FrozenBase
    from orthoreg.realbench.task_eval import base_context

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        base_logits = model(input_ids=ids).logits.clone()
    frozen = FrozenBase(model)
    with torch.no_grad():  # a "fine-tune": every weight moves, the tied embedding / LM head included
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        trained_logits = model(input_ids=ids).logits.clone()
    assert not torch.allclose(trained_logits, base_logits, atol=1e-3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    frozen.attach()
    with torch.no_grad(), base_context(model):  # what the judge and the capability read use
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=0)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained_logits, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="inside"), frozen.disable_adapter():  # restored on an error too
        raise RuntimeError("inside")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained_logits, rtol=0, atol=0)


def test_job_weight_scales_and_reader_sets():
    job = DefenceJob("summary", "reader_random", 0, strength=10.0, scale=0.5)
    assert job.weight == 5.0 and reader_set(job.arm) == "random"
    assert reader_set("reader_harmless_post+first_token_kl") == "harmless_post" and reader_set("writer") is None
    assert DefenceJob("summary", "first_token_kl", 0).weight == 1.0  # the arm's default strength
    assert DefenceJob("summary", "plain", 1).key != DefenceJob("summary", "plain", 2).key


def _driver():
    return load_script("scripts/bench_defences.py")


def test_quick_driver_runs_every_arm_and_resumes(tmp_path):
    module = _driver()
    out, cache = tmp_path / "q.json", tmp_path / "cache"
    common = ["--quick", "--steps", "10", "--workers", "0", "--out", str(out), "--cache-dir", str(cache), "--no-plot"]
    result = module.main([*common, "--arms", "all", "--seeds", "0"])
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == set(ARMS) and len(result["rows"]) == len(ARMS)  # plain seed 0 once, not twice
    build = result["rows"][0]["base_build"]  # every row names the base it was trained from
    assert len(build["sha256"]) == 16 and all(r["base_build"] == build for r in result["rows"])
    assert result["summary"]["base_builds"] == {build["sha256"]: len(ARMS)}
    scales = json.loads((tmp_path / "q.runs" / "scales.json").read_text())
    assert scales["scales"]["harmful_post"] == pytest.approx(1.0)
    for arm, row in rows.items():
        if reader_set(arm) is not None:  # the control's λ is λ × its gradient-norm scale, and the term ran
            assert row["weight"] == pytest.approx(10.0 * scales["scales"][reader_set(arm)])
            assert row["penalty_logs"]["orthoreg/reader"] > 0
    assert rows["writer"]["penalty_logs"]["orthoreg/lora"] > 0
    # the specificity arms: the recommended setting (λ, base units) with V swapped; the random V differs per seed
    for arm in ("recommended_harm_matched", "recommended_random_seed"):
        assert rows[arm]["weight"] == rows["recommended"]["weight"] and rows[arm]["penalty_logs"]["orthoreg/reader"] > 0
    assert rows["recommended_harm_matched"]["penalty_logs"]["orthoreg/reader"] != rows["recommended"]["penalty_logs"][
        "orthoreg/reader"]
    # the levers: the same λ, their own V (each changes one thing of the generic V), the term ran on it
    from orthoreg.realbench.defences import LEVER_ARMS

    for arm in LEVER_ARMS:
        assert rows[arm]["weight"] == rows["recommended"]["weight"] and rows[arm]["penalty_logs"]["orthoreg/reader"] > 0
    assert len({rows[arm]["penalty_logs"]["orthoreg/reader"] for arm in (*LEVER_ARMS, "recommended")}) == 5
    # full fine-tuning: its own lr, the same λ; the reader term ran on the full weights, and "the base" the judge and
    # the capability read see is the weights before training (a LoRA run's base NLL is the same number)
    from orthoreg.realbench.defences import FULL_FINETUNE_LR

    for arm in ("full_plain", "full_recommended"):
        assert rows[arm]["lr"] == FULL_FINETUNE_LR and rows[arm]["a_in_subspace"] is None
        capability = rows[arm]["capability"]
        assert capability["general_nll_base"] == pytest.approx(rows["plain"]["capability"]["general_nll_base"], rel=1e-6)
        assert capability["general_nll"] != capability["general_nll_base"]
    assert rows["full_recommended"]["weight"] == rows["recommended"]["weight"]
    assert rows["full_recommended"]["penalty_logs"]["orthoreg/reader"] > 0
    assert "orthoreg/reader" not in rows["full_plain"]["penalty_logs"]
    assert rows["activation_projection"]["penalty_logs"]["orthoreg/proj"] > 0
    assert rows["covariance"]["penalty_logs"]["orthoreg/cov"] > 0
    assert rows["first_token_kl"]["penalty_logs"]["first_token_kl/kl"] >= 0
    assert rows["treft"]["penalty_logs"]["treft/kv"] > 0 and rows["treft_query"]["penalty_logs"]["treft/kv"] > 0
    assert rows["treft"]["penalty_logs"]["treft/positions"] < rows["treft_query"]["penalty_logs"]["treft/positions"]
    # the anchor KL beside the recommended setting: both terms ran; the harmful and the harmless anchors differ
    for arm in ("recommended+anchor_kl", "recommended+anchor_kl_harmless", "recommended+anchor_kl_unseen"):
        logs = rows[arm]["penalty_logs"]
        assert logs["orthoreg/reader"] > 0 and logs["anchor_kl/kl"] > 0
        assert logs["anchor_kl/total"] == pytest.approx(rows[arm]["weight"] * logs["anchor_kl/kl"])
    assert rows["recommended+anchor_kl"]["penalty_logs"]["anchor_kl/kl"] != rows["recommended+anchor_kl_harmless"][
        "penalty_logs"]["anchor_kl/kl"]
    # the front door as shipped (one callback, recommended()) is the reader term plus the harmless anchor: it runs the
    # same computation as the arm that composes them by hand, while `recommended` keeps its meaning (no anchor)
    front, composed = rows["front_door"]["penalty_logs"], rows["recommended+anchor_kl_harmless"]["penalty_logs"]
    assert front["orthoreg/anchor_kl"] == pytest.approx(composed["anchor_kl/kl"], rel=1e-4)
    assert front["orthoreg/reader"] == pytest.approx(composed["orthoreg/reader"], rel=1e-4)
    assert "orthoreg/anchor_kl" not in rows["recommended"]["penalty_logs"]
    assert rows["hard_projection"]["a_in_subspace"]["max"] < 1e-6  # A_m ⟂ V_m after training
    assert rows["reader_random"]["a_in_subspace"]["max"] > 1e-3
    assert len(rows["plain"]["losses"]) == 1 and rows["plain"]["losses"] != rows["interleave"]["losses"]  # other data
    # the harm-margin guard's budget mode: its readings are the run's harm signal (one probe), λ never below λ₀
    from orthoreg.config import RECOMMENDED_READER_WEIGHT

    for arm, every in (("margin_budget", 5), ("margin_budget_fast", 1)):
        guard = rows[arm]["guard"]
        assert [h["step"] for h in guard] == list(range(every, 11, every))
        assert rows[arm]["harm_signal"]["every"] == every
        assert [r["step"] for r in rows[arm]["harm_signal"]["readings"]] == [h["step"] for h in guard]
        assert all(h["weight"] >= RECOMMENDED_READER_WEIGHT * (1 - 1e-12) for h in guard)
        assert rows[arm]["penalty_logs"]["orthoreg/reader"] > 0
    cells = result["summary"]["cells"]
    base = result["summary"]["base"]["pooled"]["attempt"]
    plain_cell = cells["summary|plain|None"]
    assert plain_cell["rise"] == [pytest.approx(100 * rows["plain"]["safety"]["pooled"]["attempt"] - base)]
    again = module.main([*common, "--arms", "all", "--seeds", "0"])  # nothing re-runs: the rows come back
    assert [r["key"] for r in again["rows"]] == [r["key"] for r in result["rows"]]
    # explicit jobs, reader and other arms mixed, once the scales exist: run in the order given, at the λ given
    mixed = module.main([*common, "--jobs", "summary:reader_random:1:2.5", "summary:plain:1"])  # --arms jobs implied
    new = mixed["rows"][len(result["rows"]):]
    assert [(r["arm"], r["seed"]) for r in new] == [("reader_random", 1), ("plain", 1)]
    assert new[0]["weight"] == pytest.approx(2.5 * scales["scales"]["random"])
    # selection seeds belong to the selection task only: on any other task every seed is fresh
    plain = mixed["summary"]["cells"]["summary|plain|None"]
    assert plain["selection"]["seeds"] == [0, 1] and "fresh" not in plain
    elsewhere = module.main([*common, "--render", "--selection-task", "roleplay"])["summary"]["cells"]["summary|plain|None"]
    assert elsewhere["fresh"]["seeds"] == [0, 1] and "selection" not in elsewhere
    # a held-out task by --jobs alone: its shipped answers are prepared, and every row carries the capability read
    # and the conditional-erosion framings
    held = module.main([*common, "--jobs", "multi_turn:recommended:0"])["rows"][-1]
    assert (held["task"], held["arm"]) == ("multi_turn", "recommended")
    assert set(held["capability"]) == {"task_nll", "task_nll_base", "general_nll", "general_nll_base"}
    assert held["capability"]["task_nll"] != held["capability"]["task_nll_base"]
    assert set(held["conditional"]) == {"system", "renamed_roles"}
    assert all(len(c["answers"]) == 96 for c in held["conditional"].values())


def test_lever_subspaces_each_change_one_thing_of_the_generic_v(tmp_path):
    """``defence_subspaces.LEVER_SETS`` on a tiny base: layer 0 added, 2k directions, four reply tokens, the task's
    prompts pooled — and everything else as in ``builtin_harmless_post``."""
    from orthoreg.core.prompts import load_builtin
    from orthoreg.reader.extraction import input_moments
    from orthoreg.realbench.defence_subspaces import LEVER_SETS, adapted_modules, build_subspaces
    from orthoreg.realbench.tiny import bpe_tokenizer, tiny_llama

    tokenizer = bpe_tokenizer()
    model = tiny_llama(tokenizer)
    info = {"harmful_targets": [], "harmless_targets": []}
    task = [f"Explain step {i} of making bread with {n} cups of flour." for i, n in enumerate(range(3, 43))]

    def build(name):
        return build_subspaces(name, model, tokenizer, info, tmp_path, task_prompts=task, task_name="bread", k=4,
                               log=lambda *_: None)

    generic = build("builtin_harmless_post")
    lever = {name: build(name) for name in LEVER_SETS}

    layer0 = lever["builtin_all_layers"]
    assert set(layer0.names) - set(generic.names) == {n for n in adapted_modules(model, first_layer=True) if ".layers.0." in n}
    assert len(set(layer0.names) - set(generic.names)) == 7 and all(torch.equal(layer0[n], generic[n]) for n in generic.names)

    double = lever["builtin_double_k"]
    assert double.names == generic.names and double.metadata["k"] == 8
    for name, v in generic.subspaces.items():  # the top 4 of the top 8 are the generic frame (signs fixed the same way)
        torch.testing.assert_close(double[name][:4], v, atol=1e-5, rtol=0)
        torch.testing.assert_close(double[name] @ double[name].T, torch.eye(8), atol=1e-5, rtol=0)

    reply4 = lever["builtin_reply4"]
    prompts = len(load_builtin("train").harmless)
    assert reply4.metadata["reply_tokens"] == 4
    assert reply4.metadata["num_positions"] == generic.metadata["num_positions"] + 3 * prompts

    union = lever["builtin_and_task_post"]
    assert union.metadata["prompt_set"]["count"] == prompts + len(task)
    # V of the pooled set: the top-4 eigenvectors of the position-weighted mean of the two sets' moments (float64)
    name = generic.names[-1]
    options = dict(modules=[name], positions=["post_instruction", "first_reply"], batch_size=16)
    m_builtin, n_builtin = input_moments(model, tokenizer, list(load_builtin("train").harmless), **options)
    m_task, n_task = input_moments(model, tokenizer, task, **options)
    pooled = (n_builtin * m_builtin[name].double() + n_task * m_task[name].double()) / (n_builtin + n_task)
    top = torch.linalg.eigh(pooled).eigenvectors[:, -4:].T
    projector = union[name].double().T @ union[name].double()
    torch.testing.assert_close(projector, top.T @ top, atol=1e-6, rtol=0)
    assert not torch.allclose(projector, generic[name].double().T @ generic[name].double(), atol=1e-3)
    with pytest.raises(ValueError, match="task's training prompts"):
        build_subspaces("builtin_and_task_post", model, tokenizer, info, tmp_path / "other", k=4, log=lambda *_: None)
