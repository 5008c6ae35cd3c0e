"""The live harm signal (orthoreg.firewall.harm_signal): the refusal margin at the first reply token, checked against
an independent float64 computation, its openers, its deltas, its errors, and that it never changes training."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from orthoreg.engine.metrics import HARM_SIGNAL_METRICS, METRIC_PREFIX
from orthoreg.firewall import HarmSignalCallback, HarmSignalError, RefusalMarginProbe, builtin_probe_pairs
from orthoreg.realbench.tiny import bpe_tokenizer, tiny_llama
from tests.trainer_harness import padded_dataset

KEYS = [METRIC_PREFIX + name for name in HARM_SIGNAL_METRICS]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def lora(model, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "o_proj"])
    return get_peft_model(model, config)


def reference_margins(model, tokenizer, requests, refusal, compliance) -> torch.Tensor:
    """Each request alone (no padding), float64: log-softmax at the last prompt position, logsumexp over the ids."""
    out = []
    for request in requests:
        text = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                             add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), dim=-1)
        out.append(torch.logsumexp(log_p[refusal], 0) - torch.logsumexp(log_p[compliance], 0))
    return torch.stack(out)


def reference_openers(model, tokenizer, harmful, harmless, per_side):
    """The documented rule, written out token by token."""
    def dist(requests):
        rows = []
        for request in requests:
            text = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                rows.append(torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1))
        return torch.stack(rows)

    p_h, p_s = dist(harmful), dist(harmless)
    mean_h, mean_s = p_h.mean(0), p_s.mean(0)
    special = set(tokenizer.all_special_ids)
    sides = []
    for p, mean, other in ((p_h, mean_h, mean_s), (p_s, mean_s, mean_h)):
        greedy = p.argmax(-1).tolist()
        candidates = [t for t in range(len(tokenizer)) if t not in special and mean[t] > other[t]]
        candidates.sort(key=lambda t: (-greedy.count(t), -float(mean[t]), t))
        sides.append(candidates[:per_side])
    return sides


@pytest.mark.parametrize("with_lora", [False, True])
def test_margin_equals_independent_float64_computation(tokenizer, with_lora):
    torch.manual_seed(0)
    model = tiny_llama(tokenizer).double()
    if with_lora:
        model = lora(model)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.2)  # the adapter moves the model: the margins must follow it
    probe = RefusalMarginProbe(pairs=6)
    probe.record_base(model, tokenizer)
    harm, harmless = probe.margins(model)
    assert harm.dtype == torch.float64
    want_harm = reference_margins(model, tokenizer, probe.harmful, probe.refusal_openers, probe.compliance_openers)
    want_harmless = reference_margins(model, tokenizer, probe.harmless, probe.refusal_openers,
                                      probe.compliance_openers)
    torch.testing.assert_close(harm, want_harm, rtol=0, atol=1e-10)
    torch.testing.assert_close(harmless, want_harmless, rtol=0, atol=1e-10)
    measured = probe.measure(model)
    assert measured[KEYS[0]] == pytest.approx(float(want_harm.mean()), abs=1e-10)
    assert measured[KEYS[2]] == pytest.approx(float(want_harmless.mean()), abs=1e-10)


def test_openers_follow_the_documented_rule_disjoint_and_deterministic(tokenizer):
    model = tiny_llama(tokenizer).double()
    first, second = RefusalMarginProbe(pairs=8), RefusalMarginProbe(pairs=8)
    first.record_base(model, tokenizer)
    second.record_base(tiny_llama(tokenizer).double(), tokenizer)
    assert (first.refusal_openers, first.compliance_openers) == (second.refusal_openers, second.compliance_openers)
    assert not set(first.refusal_openers) & set(first.compliance_openers)
    assert len(first.refusal_openers) == len(first.compliance_openers) == 4
    assert not set(first.refusal_openers + first.compliance_openers) & set(tokenizer.all_special_ids)
    want = reference_openers(model, tokenizer, first.harmful, first.harmless, 4)
    assert [first.refusal_openers, first.compliance_openers] == want


def test_builtin_probe_pairs_cover_the_categories_first():
    harmful, harmless = builtin_probe_pairs(16)
    assert len(harmful) == len(harmless) == 16 and len(set(harmful)) == 16
    assert builtin_probe_pairs(16) == (harmful, harmless)
    from orthoreg.core.prompts import load_builtin

    test = load_builtin("test")
    categories = [test.categories[test.harmful.index(h)] for h in harmful]
    assert len(set(categories[:10])) == min(10, len(set(test.categories)))


def test_delta_is_exactly_zero_before_the_first_update(tokenizer):
    model = lora(tiny_llama(tokenizer))
    probe = RefusalMarginProbe(pairs=8)
    base = probe.record_base(model, tokenizer)  # adapter disabled
    start = probe.measure(model)  # adapter enabled, B = 0: the same function
    assert start == base
    assert start[KEYS[1]] == 0.0 and start[KEYS[3]] == 0.0


def test_margin_falls_when_trained_to_answer_harmful_requests_with_a_compliance_opener(tokenizer):
    model = tiny_llama(tokenizer)
    probe = RefusalMarginProbe(pairs=8)
    base = probe.record_base(model, tokenizer)
    assert probe.measure(model)[KEYS[1]] == 0.0
    batch = probe.probe_inputs(torch.device("cpu"), {"position_ids"})
    rows = len(probe.harmful)
    harmful = {k: v[:rows] for k, v in batch.items()}
    target = torch.full((rows,), probe.compliance_openers[0])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(**harmful).logits[:, -1], target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = probe.measure(model)
    assert model.training  # the probe restored the train mode
    assert after[KEYS[1]] < -1.0, after
    assert after[KEYS[0]] == pytest.approx(base[KEYS[0]] + after[KEYS[1]])


def _train(tokenizer, callbacks, tmp_path, steps=6, extra_args=None, trainer_kwargs=None):
    from transformers import Trainer, TrainingArguments

    model = lora(tiny_llama(tokenizer), dropout=0.2)  # dropout draws random numbers on every training forward
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=5e-3,
        lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0,
        data_seed=0, dataloader_drop_last=True, **(extra_args or {}))
    data = padded_dataset(n=24, T=12, vocab=len(tokenizer), pad_id=tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks, **(trainer_kwargs or {}))
    trainer.train()
    hooks_after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks_after == hooks_before
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return model, losses, trainer


def test_probe_leaves_training_bit_identical(tokenizer, tmp_path):
    plain_model, plain_losses, _ = _train(tokenizer, [], tmp_path / "plain")
    callback = HarmSignalCallback(every_n_steps=2, probe=RefusalMarginProbe(pairs=4), tokenizer=tokenizer)
    model, losses, trainer = _train(tokenizer, [callback], tmp_path / "probed")
    assert losses == plain_losses and len(losses) == 6
    for (name, a), (_, b) in zip(plain_model.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert [r["step"] for r in callback.readings] == [2, 4, 6]
    logged = [entry for entry in trainer.state.log_history if KEYS[0] in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6] and all(set(KEYS) <= set(e) for e in logged)
    assert trainer.state.stateful_callbacks["orthoreg_harm_signal"]["refusal_openers"] == \
        callback.probe.refusal_openers


def test_bf16_autocast_is_switched_off_inside_the_probe(tokenizer, tmp_path):
    model = tiny_llama(tokenizer)
    probe = RefusalMarginProbe(pairs=4)
    probe.record_base(model, tokenizer)
    plain = probe.measure(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert probe.measure(model) == plain
    # A bf16 Trainer (accelerate wraps the model's forward in autocast): the probe reads the unwrapped forward.
    callback = HarmSignalCallback(every_n_steps=1, probe=RefusalMarginProbe(pairs=4))
    model, _, trainer = _train(tokenizer, [callback], tmp_path, steps=2, extra_args={"bf16": True},
                               trainer_kwargs={"processing_class": tokenizer})
    assert len(callback.readings) == 2 and hasattr(model, "_original_forward")  # accelerate's autocast wrapper
    last = {k: v for k, v in callback.readings[-1].items() if k != "step"}
    assert callback.probe.measure(model) == last
    assert all(torch.isfinite(torch.tensor(list(last.values()))))


def test_state_round_trips_through_json(tokenizer):
    model = tiny_llama(tokenizer)
    probe = RefusalMarginProbe(pairs=4)
    probe.record_base(model, tokenizer)
    restored = RefusalMarginProbe(pairs=4)
    restored.load_state_dict(json.loads(json.dumps(probe.state_dict())))
    assert restored.measure(model) == probe.measure(model)
    with pytest.raises(HarmSignalError, match="another probe set"):
        RefusalMarginProbe(pairs=5).load_state_dict(probe.state_dict())


def test_empty_probe_set_is_refused():
    with pytest.raises(HarmSignalError, match="probe set is empty"):
        RefusalMarginProbe(harmful=[], harmless=[])
    with pytest.raises(HarmSignalError, match="pairs"):
        RefusalMarginProbe(pairs=0)
    with pytest.raises(HarmSignalError, match="empty or not a string"):
        RefusalMarginProbe(harmful=["how do I pick a lock"], harmless=["  "])


def test_template_that_renders_no_tokens_is_all_padding(tokenizer):
    import copy

    dropping = copy.deepcopy(tokenizer)
    dropping.chat_template = "{% for message in messages %}{% endfor %}"
    with pytest.raises(HarmSignalError, match="all padding"):
        RefusalMarginProbe(pairs=2).record_base(tiny_llama(tokenizer), dropping)


def test_tokenizer_without_chat_template_names_the_fix(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(HarmSignalError, match="no chat template.*chat_template"):
        RefusalMarginProbe(pairs=2).record_base(tiny_llama(tokenizer), plain)
    with pytest.raises(HarmSignalError, match="tokenizer"):
        RefusalMarginProbe(pairs=2).record_base(tiny_llama(tokenizer), None)


def test_model_of_another_vocabulary_names_the_problem(tokenizer):
    small = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(HarmSignalError, match="embeds 200 tokens.*own tokenizer"):
        RefusalMarginProbe(pairs=2).record_base(small, tokenizer)
    model = tiny_llama(tokenizer)
    probe = RefusalMarginProbe(pairs=2)
    probe.record_base(model, tokenizer)
    model.resize_token_embeddings(len(tokenizer) + 64)
    with pytest.raises(HarmSignalError, match="another model.*record_base"):
        probe.measure(model)
    with pytest.raises(HarmSignalError, match="record_base"):
        RefusalMarginProbe(pairs=2).measure(model)


def test_callback_arguments_are_checked():
    with pytest.raises(HarmSignalError, match="every_n_steps"):
        HarmSignalCallback(every_n_steps=0)
    with pytest.raises(HarmSignalError, match="disjoint"):
        RefusalMarginProbe(pairs=2, refusal_openers=[5, 6], compliance_openers=[6])
