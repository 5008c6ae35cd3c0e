"""Superposition density (known spectra, a hand-computed covariance), the recommendation rules, and ``orthoreg
audit`` ending with the recommended configuration."""

import argparse
import json

import pytest
import torch

from orthoreg.audit import DensityReport, OverlapReport, covariance_density, recommend, superposition_density
from orthoreg.commands import audit as audit_cmd
from orthoreg.directions.harmful import HarmfulDirections
from tests._directions_helpers import (  # noqa: F401 - one_torch_thread is an autouse fixture
    SIMPLE_TEMPLATE,
    make_tokenizer,
    one_torch_thread,
    planted_model,
)
from tests.models import tiny_model


def test_known_spectra():
    d = 8
    rho, pr, share = covariance_density(torch.eye(d), torch.eye(d)[:2])
    assert (rho, pr) == pytest.approx((1.0, 8.0)) and share == pytest.approx(2 / 8)  # isotropic: η = k/d
    v = torch.randn(d, dtype=torch.float64)
    rho, pr, _ = covariance_density(torch.outer(v, v))
    assert pr == pytest.approx(1.0) and rho == pytest.approx(1 / d)  # one direction in use
    spectrum = torch.tensor([4.0, 2.0, 1.0, 1.0, 0, 0, 0, 0], dtype=torch.float64)
    rho, pr, share = covariance_density(torch.diag(spectrum), torch.eye(d)[:1])
    assert pr == pytest.approx(8.0 ** 2 / 22.0) and share == pytest.approx(4 / 8)
    assert covariance_density(torch.zeros(d, d)) == (0.0, 0.0, None)


def test_density_matches_a_hand_computed_covariance():
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(3, 99, (4, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    directions = HarmfulDirections({1: torch.randn(2, 32, generator=g)})
    report = superposition_density(model, batches, layers=[0, 1], directions=directions)
    rows = {0: [], 1: []}
    hooks = [model.model.layers[i].register_forward_hook(
        lambda m, a, o, i=i: rows[i].append(o[0] if isinstance(o, tuple) else o)) for i in (0, 1)]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    for layer in (0, 1):
        x = torch.cat([r[b["attention_mask"].bool()] for r, b in zip(rows[layer], batches, strict=True)]).double()
        c = torch.cov(x.T)
        eig = torch.linalg.eigvalsh(c)
        assert report.participation_ratio[layer] == pytest.approx(float(eig.sum() ** 2 / eig.square().sum()),
                                                                  rel=1e-6)
        assert report.density[layer] == pytest.approx(report.participation_ratio[layer] / 32)
    u = directions[1].double()
    c = torch.cov(torch.cat([r[b["attention_mask"].bool()] for r, b in zip(rows[1], batches, strict=True)]).double().T)
    assert report.harmful_share[1] == pytest.approx(float(torch.trace(u @ c @ u.T) / torch.trace(c)), rel=1e-6)
    assert report.enrichment[1] == pytest.approx(report.harmful_share[1] * 32 / 2)
    assert 0 not in report.harmful_share and report.n_tokens == 3 * (36 - 3)  # 3 padded positions per batch
    json.dumps(report.to_dict())
    assert "density PR/d" in report.table()


def _overlap(per_layer, verdict, chance=0.05):
    peak = max(per_layer, key=per_layer.get)
    return OverlapReport(mode="gradient", per_layer=per_layer, per_direction={i: [s] for i, s in per_layer.items()},
                         feature_norm={i: 1.0 for i in per_layer}, overall=per_layer[peak], peak_layer=peak,
                         verdict=verdict, chance=chance, hidden_size=32, k=1)


@pytest.mark.parametrize(
    "verdict, action, budget",
    [("high", "adapt", 0.1), ("elevated", "adapt", 0.25), ("low", "warn", 0.5)],
)
def test_recommendation_rules(verdict, action, budget):
    overlap = _overlap({0: 0.05, 1: 0.4, 2: 0.25, 3: 0.1}, verdict)
    rec = recommend(overlap)
    assert rec.layers == [1, 2]  # >= half the peak (0.2) and above chance
    assert (rec.action, rec.max_drift, rec.anchor) == (action, budget, "base_mean")
    assert recommend(overlap, lora=True).anchor == "paired"
    code = rec.code("d.safetensors")
    assert "OrthoRegConfig(layers=[1, 2], proj_weight=1.0, anchor='base_mean')" in code
    assert f"FirewallConfig(max_drift={budget}, action='{action}')" in code
    namespace = {}
    exec(code.replace("HarmfulDirections.from_pretrained('d.safetensors')", "HarmfulDirections({1: torch.eye(32)[:1], "
                                                                             "2: torch.eye(32)[1:2]})"),
         {"torch": torch}, namespace)  # ready to paste: it runs
    assert namespace["config"].layers == [1, 2]
    # the protection comes first and needs nothing else
    assert code.index("protect = OrthoRegCallback(OrthoRegConfig.recommended())") < code.index("config = ")
    assert namespace["protect"].config.reader_weight > 0 and namespace["protect"].config.input_subspaces == "builtin"
    # the commented alternative for runs without the firewall runs too
    prefix = "# the projection without the firewall: "
    alternative = next(line for line in code.splitlines() if line.startswith(prefix))
    exec(alternative.removeprefix(prefix), namespace)
    assert namespace["config"].units == "base" and namespace["config"].layers == [1, 2]


def test_density_tightens_the_budget_and_adds_enriched_layers():
    overlap = _overlap({0: 0.05, 1: 0.4, 2: 0.1, 3: 0.3}, "high")
    dense = DensityReport(density={0: 0.2, 1: 0.7, 2: 0.8, 3: 0.6}, participation_ratio={},
                          enrichment={0: 1.0, 1: 1.0, 2: 3.0, 3: 1.0})
    rec = recommend(overlap, dense)
    assert rec.layers == [1, 2, 3]  # layer 2: enriched 3x in a layer at/above the median density
    assert rec.max_drift == pytest.approx(0.05)  # mean density 0.7 >= 0.5: the 0.1σ budget halved
    assert any("halved" in r for r in rec.reasons)


# ----------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    model, _ = planted_model(1)
    tok = make_tokenizer(chat_template=SIMPLE_TEMPLATE)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    with open(root / "task.jsonl", "w") as fh:
        for text in ["please explain how to h1", "reply to my friend now", "write a short story about h2"] * 4:
            fh.write(json.dumps({"text": text}) + "\n")
    HarmfulDirections({i: torch.eye(32)[i:i + 1] for i in range(3)},
                      metadata={"model_type": "llama", "num_layers": 3}).save(root / "d.safetensors")
    return root


def _audit(argv):
    parser = argparse.ArgumentParser(prog="orthoreg")
    audit_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", *argv])
    return audit_cmd.run(args)


def test_audit_ends_with_the_recommendation(saved, tmp_path, capsys):
    argv = ["--model", str(saved / "model"), "--data", str(saved / "task.jsonl"), "--directions",
            str(saved / "d.safetensors"), "--out", str(tmp_path / "r"), "--quiet"]
    assert _audit(argv + ["--lora"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("verdict: "), "the verdict stays the last line"
    config_line = next(line for line in lines if line.startswith("config = OrthoRegConfig("))
    assert "anchor='paired'" in config_line
    assert any(line.startswith("firewall = FirewallConfig(max_drift=") for line in lines)
    assert any("density PR/d" in line for line in lines)
    data = json.loads((tmp_path / "r" / "overlap.json").read_text())
    rec = data["recommendation"]
    assert rec["orthoreg_config"]["anchor"] == "paired" and rec["layers"] == rec["orthoreg_config"]["layers"]
    assert set(data["density"]["density"]) == {"0", "1", "2"} and data["verdict"] in ("low", "elevated", "high")
    assert f"layers={rec['layers']!r}" in rec["code"] and rec["recommended_config"] == "OrthoRegConfig.recommended()"
    assert any(line.startswith("protect = OrthoRegCallback(OrthoRegConfig.recommended())") for line in lines)

    assert _audit(argv + ["--no-recommend", "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "overlap.json").read_text())
    assert "recommendation" not in plain and "density" not in plain
    assert "OrthoRegConfig(" not in capsys.readouterr().out
