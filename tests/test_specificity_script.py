"""``scripts/specificity_report.py`` on the tiny quick base: every V described, the energy-matched V matched, and
the base-units gradient norm at an adapter against the closed-form gradient written here in float64."""

from __future__ import annotations

import json

import pytest
import torch

from tests._scripts import load_script


def test_quick_report_describes_every_subspace_and_its_gradient_norms(tmp_path):
    module = load_script("scripts/specificity_report.py")
    cache, out = tmp_path / "cache", tmp_path / "s.json"
    first = module.main(["--quick", "--cache-dir", str(cache), "--out", str(out), "--tasks", "howto_steps"])
    described = first["subspaces"]
    assert set(described) == {"builtin_harmless_post", "harm_matched", "harmful_post", "harmful_prompt",
                              "harmless_post", "contrastive", "task_post:howto_steps", "random:0", "random:1",
                              "random:2"}
    generic, matched = described["builtin_harmless_post"], described["harm_matched"]
    assert generic["overlap_generic"] == pytest.approx(1.0, abs=1e-6)
    assert matched["energy_pooled"] == pytest.approx(generic["energy_pooled"], abs=2e-3)  # the matching rule
    assert matched["harm_contrast"] >= generic["harm_contrast"] - 1e-6
    for entry in described.values():
        assert 0.0 <= entry["energy_pooled_min"] <= entry["energy_pooled"] <= entry["energy_pooled_max"] <= 1.0
    assert all(described[f"random:{s}"]["energy_pooled"] < generic["energy_pooled"] / 2 for s in range(3))
    assert json.loads(out.read_text())["subspaces"]["harm_matched"]["tilt"]["zero_share"] <= 1.0

    # an adapter over every adapted module of the tiny base, then the gradient norms against a float64 closed form
    from orthoreg import InputSubspaces
    from orthoreg.realbench.aligned import load_aligned
    from orthoreg.realbench.defence_subspaces import adapted_modules, save_adapter

    folder = next(cache.glob("aligned*"))
    model, _ = load_aligned(str(folder))
    g = torch.Generator().manual_seed(0)
    adapter = {}
    for name in adapted_modules(model):
        w = model.get_submodule(name).weight
        adapter[name] = (torch.randn(2, w.shape[1], generator=g), torch.randn(w.shape[0], 2, generator=g), 2.0)
    save_adapter(adapter, tmp_path / "adapter-howto_steps-plain-0.safetensors")
    second = module.main(["--quick", "--cache-dir", str(cache), "--out", str(out), "--tasks", "howto_steps",
                          "--adapters", str(tmp_path / "adapter-howto_steps-plain-0.safetensors")])
    entry = second["subspaces"]["builtin_harmless_post"]
    frames = InputSubspaces.load(next(folder.glob("subspaces-builtin_harmless_post-*.safetensors")))
    # P = (1/M) Σ_m s²‖B A Vᵀ‖² / r_m, r_m = ‖W₀ Vᵀ‖²: ∂P/∂B = 2s² B N Nᵀ / (M r_m), ∂P/∂A = 2s² Bᵀ B N V / (M r_m)
    squared_base, squared_absolute = 0.0, 0.0
    modules = len(adapter)
    for name, (a, b, s) in adapter.items():
        a, b, v = a.double(), b.double(), frames[name].double()
        r = float((model.get_submodule(name).weight.detach().double() @ v.T).pow(2).sum())
        n = a @ v.T
        grad_b, grad_a = 2 * s * s * b @ n @ n.T, 2 * s * s * b.T @ b @ n @ v
        squared_absolute += float(grad_b.pow(2).sum() + grad_a.pow(2).sum())
        squared_base += float((grad_b / (modules * r)).pow(2).sum() + (grad_a / (modules * r)).pow(2).sum())
    assert entry["gradient_norm_absolute"]["howto_steps-plain-0"] == pytest.approx(squared_absolute ** 0.5, rel=1e-6)
    assert entry["gradient_norm_base_units"]["howto_steps-plain-0"] == pytest.approx(squared_base ** 0.5, rel=1e-6)
    with pytest.raises(SystemExit, match="not found"):
        module.main(["--quick", "--cache-dir", str(cache), "--out", str(out), "--adapters", str(tmp_path / "none")])
