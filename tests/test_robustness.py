"""Bad input and bad numbers: every case is made exact or refused with a message naming the problem and the fix.

NaN/Inf calibration batches, NaN LoRA weights, corrupt or mismatched saved state, hooks left behind by a raised
``train()``, models orthoreg cannot guard, packed batches, guarded layers without directions.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from orthoreg import OrthoLoRA, OrthoRegCallback, OrthoRegConfig
from orthoreg.core.capture import UnsupportedArchitectureError, find_decoder_stack, token_mask
from orthoreg.engine.health import NonFiniteHiddenStateError
from orthoreg.engine.regularizer import OrthoRegularizer
from tests.models import random_directions, tiny_model
from tests.trainer_harness import make_trainer, padded_dataset


def dirs(layers=(1, 2), d=32, k=2, seed=0):
    return random_directions(layers, d, k, seed)


def poison_first_forward(model, value: float, layer: int = 1):
    """Puts ``value`` into one hidden state of ``layer`` on the first training forward only."""
    calls = {"n": 0}

    def hook(module, args, output):
        if not module.training or not torch.is_grad_enabled():
            return None
        calls["n"] += 1
        if calls["n"] > 1:
            return None
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[0, 0, 0] = value
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return model.model.layers[layer].register_forward_hook(hook)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_calibration_batch_is_refused_and_weights_untouched(tmp_path, value):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    poison_first_forward(model, value)
    callback = OrthoRegCallback(OrthoRegConfig(layers=[1], proj_weight=1.0, anchor="base_mean"), dirs((1,)))
    with pytest.raises(NonFiniteHiddenStateError, match="calibration micro-batch.*r would stay NaN"):
        make_trainer(model, [callback], tmp_path).train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not callback.regularizer.attached  # the hooks went with the failed train()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_skip_policy_calibrates_on_the_next_finite_batch_and_writes_valid_json(value, caplog):
    # A NaN in the hidden states would also make the task loss NaN and ruin the weights in a real run; what skip can
    # promise is that r is never NaN: the poisoned batch is left out and the next finite one is recorded.
    model = tiny_model()
    model.train()
    config = OrthoRegConfig(layers=[1], proj_weight=1.0, anchor="base_mean", on_nonfinite="skip")
    u = dirs((1,))
    reg = OrthoRegularizer(config, u, check="step").attach(model)
    batch = {k: torch.tensor(v) for k, v in padded_dataset(n=4)[:].items()}
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    poisoned = embeds.clone()
    poisoned[0, 1, 3] = value
    with caplog.at_level(logging.WARNING, logger="orthoreg.base_mean"):
        model(inputs_embeds=poisoned, attention_mask=batch["attention_mask"])
        assert "Calibrating on the next finite micro-batch" in caplog.text
        assert reg.base_reference == {} and reg.calibrating
        reg.step = 1  # one (ruined) update later
        captured = {}
        handle = model.model.layers[1].register_forward_hook(lambda m, a, o: captured.setdefault("h", o))
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        handle.remove()
        assert "after 1 optimizer update" in caplog.text
    r = reg.base_reference[1]
    rows = captured["h"].detach().double()[batch["attention_mask"].bool()]
    assert torch.allclose(r.double(), (rows @ u[1].double().T).mean(0), rtol=1e-5, atol=1e-6)
    assert not reg.calibrating
    # json.dumps writes a bare NaN unless told not to; the state must be strict JSON.
    json.dumps(reg.state_dict(), allow_nan=False)


def test_explicit_calibration_refuses_a_nonfinite_batch():
    model = tiny_model()
    reg = OrthoRegularizer(OrthoRegConfig(layers=[1], proj_weight=1.0, anchor="base_mean"), dirs((1,)))
    batch = {k: torch.tensor(v) for k, v in padded_dataset(n=2)[:].items()}
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    embeds[0, 1, 3] = float("inf")
    with pytest.raises(NonFiniteHiddenStateError, match="layer 1"):
        reg.calibrate(model, iter([{"inputs_embeds": embeds, "attention_mask": batch["attention_mask"]}]))


# ------------------------------------------------------------------------------------------------ saved state
def attached_regularizer(k: int = 2):
    model = tiny_model()
    reg = OrthoRegularizer(OrthoRegConfig(layers=[1, 2], proj_weight=1.0, anchor="base_mean"), dirs(k=k))
    return reg.attach(model)


def good_state():
    return {"format_version": 1, "anchor": "base_mean", "layers": [1, 2],
            "base_reference": {"1": [0.5, -0.25], "2": [1.0, 2.0]},
            "calibration_tokens": {"1": 10, "2": 10}, "calibration_batches_seen": 1,
            "base_square_means": {"1": 0.5, "2": 5.5}, "base_covariance": {}}


def test_a_valid_state_round_trips_exactly():
    reg = attached_regularizer()
    reg.load_state_dict(good_state())
    assert reg.base_reference[1].tolist() == [0.5, -0.25]
    assert reg.state_dict() == good_state()


@pytest.mark.parametrize("corrupt,match", [
    (lambda s: s["base_reference"].update({"1": [0.5]}), "1 entries but the directions of that layer have k = 2"),
    (lambda s: s["base_reference"].update({"1": [0.5, 0.1, 0.2]}), "3 entries"),
    (lambda s: s["base_reference"].update({"2": [float("nan"), 1.0]}), "not finite"),
    (lambda s: s["base_reference"].update({"2": [float("inf"), 1.0]}), "not finite"),
    (lambda s: s["base_reference"].update({"2": "0.5,1.0"}), "list of numbers"),
    (lambda s: s["base_reference"].update({"7": [0.5, 1.0]}), "does not guard"),
    (lambda s: s.pop("calibration_tokens"), "corrupt"),
    (lambda s: s.update(calibration_batches_seen=-1), "corrupt"),
    (lambda s: s["calibration_tokens"].update({"1": "ten"}), "int >= 0"),
    (lambda s: s.update(layers=[1]), "guarded layers"),
    (lambda s: s.update(anchor="paired"), "anchor"),
    (lambda s: s.update(format_version=9), "format_version"),
    (lambda s: s["base_square_means"].update({"1": float("nan")}), "finite numbers"),
    (lambda s: s.update(base_covariance=[1.0]), "finite numbers"),
])
def test_a_corrupt_or_mismatched_state_is_refused_by_name(corrupt, match):
    reg = attached_regularizer()
    state = good_state()
    corrupt(state)
    with pytest.raises(ValueError, match=match):
        reg.load_state_dict(state)
    assert reg.base_reference == {}  # nothing half-loaded


def test_resume_from_a_checkpoint_with_a_corrupt_state_fails_before_training(tmp_path):
    model = tiny_model()
    config = OrthoRegConfig(layers=[1], proj_weight=1.0, anchor="base_mean")
    make_trainer(model, [OrthoRegCallback(config, dirs((1,)))], tmp_path, save_strategy="steps", save_steps=2).train()
    path = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(path.read_text())
    state["stateful_callbacks"]["orthoreg"]["base_reference"]["1"] = [1.0]  # k = 2 directions
    path.write_text(json.dumps(state))
    resumed = OrthoRegCallback(config, dirs((1,)))
    trainer = make_trainer(tiny_model(), [resumed], tmp_path, steps=3)
    with pytest.raises(ValueError, match="k = 2"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


# ------------------------------------------------------------------------------------------------ NaN LoRA
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_lora_weights_raise_before_backward_and_skip_drops_the_penalty(value, caplog):
    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["o_proj", "down_proj"],
                                                     init_lora_weights=False))
    config = OrthoRegConfig(layers=[1, 2], proj_weight=0.0, lora_weight=1.0)
    ortho = OrthoLoRA(model, config, dirs())
    ortho.train()
    with torch.no_grad():
        model.base_model.model.model.layers[2].mlp.down_proj.lora_B["default"].weight[0, 0] = value
    batch = {k: torch.tensor(v) for k, v in padded_dataset(n=2)[:].items()}
    with pytest.raises(NonFiniteHiddenStateError, match="lora/.*layers.2.mlp.down_proj"):
        ortho(**batch)
    skipping = OrthoLoRA(model, OrthoRegConfig(layers=[1, 2], proj_weight=0.0, lora_weight=1.0,
                                               on_nonfinite="skip"), dirs())
    skipping.train()
    ortho.remove_hooks()
    with caplog.at_level(logging.WARNING, logger="orthoreg.engine.health"):
        out = skipping(**batch)
    assert out.orthoreg_penalty.item() == 0.0
    assert "penalty was dropped" in caplog.text
    assert skipping.pop_metrics()["orthoreg/skipped"] == 1.0


# ------------------------------------------------------------------------------------------------ stale hooks
def test_hooks_of_a_raised_train_are_removed_and_a_second_callback_injects_once(tmp_path):
    model = tiny_model()
    config = OrthoRegConfig(layers=[1], cov_weight=1.0, proj_weight=0.0)
    failing = OrthoRegCallback(config)
    handle = poison_first_forward(model, float("nan"))
    with pytest.raises(NonFiniteHiddenStateError):
        make_trainer(model, [failing], tmp_path).train()
    handle.remove()
    assert not failing.regularizer.attached
    stack = find_decoder_stack(model)
    assert not stack.layers[1]._forward_hooks and not stack.stack._forward_hooks and not model._forward_pre_hooks

    # The same failure where the Trainer's train() cannot be wrapped (the callback added after construction):
    # the next OrthoRegCallback on the model removes the leftover hooks instead of injecting alongside them.
    late = OrthoRegCallback(config)
    trainer = make_trainer(model, [], tmp_path)
    trainer.add_callback(late)
    handle = poison_first_forward(model, float("nan"))
    with pytest.raises(NonFiniteHiddenStateError):
        trainer.train()
    handle.remove()
    assert late.regularizer.attached  # nothing could remove them
    fresh = OrthoRegCallback(config)
    with pytest.warns(UserWarning, match="did not finish"):
        make_trainer(model, [fresh], tmp_path, steps=1).train()
    assert not late.regularizer.attached


# ------------------------------------------------------------------------------------------------ architectures
def test_encoder_decoder_and_bidirectional_encoders_are_refused():
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=99, d_model=32, d_ff=37, num_layers=2, num_heads=4,
                                             d_kv=8, decoder_start_token_id=0))
    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder"):
        find_decoder_stack(t5)
    bert = BertForMaskedLM(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=37))
    with pytest.raises(UnsupportedArchitectureError, match="bidirectional encoder"):
        OrthoRegularizer(OrthoRegConfig(layers=[0], cov_weight=1.0, proj_weight=0.0)).attach(bert)


def test_guarded_layers_without_directions_warn():
    with pytest.warns(UserWarning, match=r"guarded layers \[2\] have no harmful directions"):
        OrthoRegularizer(OrthoRegConfig(layers=[1, 2], proj_weight=1.0), dirs((1,))).attach(tiny_model())


def test_packed_batch_mask_uses_labels_to_end_each_row():
    # Two packed sequences (lengths 3 and 2) then two padding tokens, as TRL's padding-free collator builds them:
    # position id 0 and label -100 on padding and on every sequence start.
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0]])
    labels = torch.tensor([[-100, 5, 6, -100, 8, -100, -100]])
    mask = token_mask({"position_ids": position_ids, "labels": labels}, (1, 7))
    assert mask.tolist() == [[True, True, True, True, True, False, False]]  # before: the first padding counted
    without_labels = token_mask({"position_ids": position_ids}, (1, 7))
    assert without_labels.tolist() == [[True, True, True, True, True, True, False]]  # at most one, undecidable
