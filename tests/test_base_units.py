"""``OrthoRegConfig(units="base")``: each activation term divided by its base-model value, averaged over layers.

The reference is float64 math written here: the units are recomputed by hand from the first (calibration)
micro-batch's hidden states, the penalties from their definitions.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import HfArgumentParser

from orthoreg import OrthoRegCallback, OrthoRegConfig
from orthoreg.engine.regularizer import OrthoRegularizer
from tests.models import random_directions, tiny_model
from tests.trainer_harness import (
    assert_grads_close,
    capture_layers,
    padded_dataset,
    ref_covariance,
    train_one_step,
)


def dirs(layers=(1, 2), d=32, k=2, seed=0):
    return random_directions(layers, d, k, seed)


def base_unit_penalty_grads(model, batches, config, directions, ga):
    """∇_θ Σ_mb (1/GA)·(λ_cov mean_ℓ cov_ℓ/cov_ℓ⁰ + λ_proj mean_ℓ proj_ℓ/var_ℓ⁰), units from micro-batch 0, float64."""
    model = copy.deepcopy(model)
    model.train()
    layers = [1, 2]
    units: dict[str, dict[int, torch.Tensor]] = {"cov": {}, "proj": {}, "r": {}}
    model.zero_grad(set_to_none=True)
    for mb, batch in enumerate(batches):
        mask = batch["attention_mask"].bool()
        hs = capture_layers(model, layers, batch)
        total = 0
        for i in layers:
            cov = ref_covariance(hs[i], mask)
            coords = hs[i].double()[mask] @ directions[i].double().T
            if mb == 0:
                units["cov"][i] = cov.detach()
                units["r"][i] = coords.detach().mean(0)
                units["proj"][i] = (coords.detach() - units["r"][i]).square().sum(1).mean()
            proj = (coords - units["r"][i]).square().sum(1).mean()
            total = total + config.cov_weight * cov / units["cov"][i] / len(layers)
            total = total + config.proj_weight * proj / units["proj"][i] / len(layers)
        (total / ga).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ga", [1, 2])
def test_base_units_gradients_equal_float64_reference(tmp_path, ga):
    config = OrthoRegConfig(layers=[1, 2], cov_weight=0.5, proj_weight=2.0, anchor="base_mean", units="base")
    directions = dirs()
    data = padded_dataset(n=8)
    base = tiny_model()
    plain, _, _ = train_one_step(copy.deepcopy(base), data, ga=ga, output_dir=str(tmp_path / "plain"))
    got, batches, _ = train_one_step(copy.deepcopy(base), data, [OrthoRegCallback(config, directions)], ga=ga,
                                     output_dir=str(tmp_path / "reg"))
    penalty = base_unit_penalty_grads(base, batches, config, directions, ga)
    assert_grads_close(got, {n: plain[n] + penalty.get(n, 0) for n in plain})


def step_zero_metrics(config: OrthoRegConfig, scale: float) -> dict[str, float]:
    """The regulariser's metrics on one training forward of a model whose hidden states are scaled by ``scale``
    after the first layer (as a massive-activation model's are)."""
    model = tiny_model()
    model.train()
    if scale != 1.0:
        model.model.layers[0].register_forward_hook(
            lambda m, a, o: (o[0] * scale, *o[1:]) if isinstance(o, tuple) else o * scale)
    reg = OrthoRegularizer(config, dirs()).attach(model)
    model(**{k: torch.tensor(v) for k, v in padded_dataset(n=4)[:].items()})
    return reg.pop_metrics()


def test_each_term_starts_at_one_on_the_calibration_batch_whatever_the_scale():
    """The point of base units: the same λ gives the same step-0 penalty on a model whose activations are 1000×
    larger."""
    base = OrthoRegConfig(layers=[1, 2], cov_weight=1.0, proj_weight=1.0, anchor="base_mean", units="base")
    for scale in (1.0, 1e3):
        metrics = step_zero_metrics(base, scale)
        assert metrics["proj"] == pytest.approx(1.0, rel=1e-5)  # r is this batch's mean: proj = its variance
        assert metrics["cov"] == pytest.approx(1.0, rel=1e-5)
    absolute = OrthoRegConfig(layers=[1, 2], cov_weight=1.0, proj_weight=1.0, anchor="base_mean")
    values = [step_zero_metrics(absolute, scale)["total"] for scale in (1.0, 1e3)]
    assert values[1] / values[0] > 1e3  # the absolute form is not comparable across scales


def test_base_units_survive_a_checkpoint_round_trip():
    config = OrthoRegConfig(layers=[1, 2], cov_weight=1.0, proj_weight=1.0, anchor="paired", units="base")
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    model.train()
    batch = {k: torch.tensor(v) for k, v in padded_dataset(n=4)[:].items()}
    reg = OrthoRegularizer(config, dirs()).attach(model)
    model(**batch)
    reg.pop_metrics()
    state = reg.state_dict()
    reg.step = 3
    model(**batch)
    want = reg.pop_metrics()
    reg.detach()
    fresh = OrthoRegularizer(config, dirs()).attach(model)
    fresh.load_state_dict(state)
    fresh.step = 3
    model(**batch)
    assert fresh.pop_metrics() == pytest.approx(want, rel=1e-6)


def test_zero_base_variance_is_refused_by_name():
    model = tiny_model()
    model.train()
    config = OrthoRegConfig(layers=[1], cov_weight=1.0, proj_weight=0.0, units="base", mask="prompt_end")
    OrthoRegularizer(config).attach(model)
    batch = {k: torch.tensor(v) for k, v in padded_dataset(n=1)[:].items()}  # one row: one prompt_end token
    with pytest.raises(ValueError, match="covariance penalty at layer 1 is 0"):
        model(**batch)


def test_activation_projection_config_and_the_command_line():
    config = OrthoRegConfig.activation_projection(layers=[2, 5])
    assert (config.units, config.anchor, config.proj_weight, config.cov_weight) == ("base", "base_mean", 0.1, 0.0)
    (parsed,) = HfArgumentParser(OrthoRegConfig).parse_args_into_dataclasses(["--units", "base", "--layers", "1,3"])
    assert parsed.units == "base" and parsed.layers == [1, 3]
    with pytest.raises(ValueError, match="`units`"):
        OrthoRegConfig(units="relative")
