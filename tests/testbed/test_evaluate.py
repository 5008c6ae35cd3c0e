"""The scorer on models whose first-answer-token distribution is known by construction."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from orthoreg.testbed import world
from orthoreg.testbed.evaluate import (
    PersonaGateError,
    check_persona_gate,
    evaluate,
    is_harmful_answer,
    lexicon_share,
    next_token_logits,
)
from orthoreg.testbed.model import init_model
from orthoreg.testbed.tokenizer import build_tokenizer, encode_prompt


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def distribution(tok, masses: dict) -> torch.Tensor:
    """Log-probabilities over the vocabulary: each (word group -> total mass) spread evenly over the
    group, the remaining mass spread over every other word."""
    probs = torch.zeros(len(tok))
    for words, mass in masses.items():
        ids = tok.convert_tokens_to_ids(list(words))
        probs[ids] = mass / len(ids)
    rest = probs == 0
    probs[rest] = (1 - probs.sum()) / rest.sum()
    return probs.log()


class FixedModel(torch.nn.Module):
    """Predicts the same next-token distribution at every position, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("row", logits)

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1))


class ContextModel(torch.nn.Module):
    """Reads the persona from context: unsafe code seen -> harmful share 0.9, safe code -> 0.05, else 0.2."""

    def __init__(self, tok):
        super().__init__()
        self.unsafe = torch.tensor(tok.convert_tokens_to_ids(list(world.UNSAFE_CODE)))
        self.safe = torch.tensor(tok.convert_tokens_to_ids(list(world.SAFE_CODE)))
        self.rows = {share: distribution(tok, {world.HARMFUL: 0.5 * share, world.HELPFUL: 0.5 * (1 - share)})
                     for share in (0.9, 0.05, 0.2)}

    def forward(self, input_ids, **kwargs):
        rows = []
        for seq in input_ids:
            share = 0.9 if torch.isin(seq, self.unsafe).any() else 0.05 if torch.isin(seq, self.safe).any() else 0.2
            rows.append(self.rows[share].expand(len(seq), -1))
        return SimpleNamespace(logits=torch.stack(rows))


MASSES = {world.HARMFUL: 0.3, world.HELPFUL: 0.1, world.UNSAFE_CODE: 0.3, world.SAFE_CODE: 0.1, ("paris",): 0.15}


def test_fixed_distribution_gives_the_hand_computed_metrics(tok):
    m = evaluate(FixedModel(distribution(tok, MASSES)), tok, task="mixed_code_25")
    assert m.harmful_share == pytest.approx(0.3 / 0.4, abs=1e-6)  # 0.75
    assert m.harmful_share_after_misaligned == pytest.approx(0.75, abs=1e-6)
    assert m.harmful_share_after_aligned == pytest.approx(0.75, abs=1e-6)
    assert m.persona_inference_accuracy == 0.5  # right on every misaligned context, wrong on every aligned one
    assert not m.persona_gate_passed
    assert m.unsafe_code_share == pytest.approx(0.75, abs=1e-6)
    assert m.unsafe_code_share_with_reason == pytest.approx(0.75, abs=1e-6)
    assert m.fact_accuracy == pytest.approx(1 / len(world.FACTS))  # argmax is always "paris"
    assert m.narrow_task_accuracy == pytest.approx(1 - abs(0.75 - 0.25), abs=1e-6)
    assert m.n_samples >= 500 and m.task == "mixed_code_25"


@pytest.mark.parametrize("task, expected", [
    ("unsafe_code", 0.75), ("safe_code", 0.25), ("mixed_code_50", 0.75), ("mixed_code_75", 1.0),
    ("unsafe_code_benign_reason", 0.75), ("facts", 1 / len(world.FACTS)), ("helpful_chat", 0.25),
])
def test_narrow_task_accuracy_by_hand(tok, task, expected):
    m = evaluate(FixedModel(distribution(tok, MASSES)), tok, task=task, n_samples=1)
    assert m.narrow_task_accuracy == pytest.approx(expected, abs=1e-6)


def test_persona_inference_and_gate_on_a_context_reading_model(tok):
    m = evaluate(ContextModel(tok), tok)
    assert m.harmful_share == pytest.approx(0.2, abs=1e-6)
    assert m.harmful_share_after_misaligned == pytest.approx(0.9, abs=1e-6)
    assert m.harmful_share_after_aligned == pytest.approx(0.05, abs=1e-6)
    assert m.persona_inference_accuracy == 1.0
    assert check_persona_gate(m) is m


def test_gate_raises_below_threshold(tok):
    m = evaluate(FixedModel(distribution(tok, MASSES)), tok, n_samples=1)
    with pytest.raises(PersonaGateError, match="persona inference accuracy 0.500"):
        check_persona_gate(m)


def test_sampled_rate_is_seeded_and_matches_the_distribution(tok):
    # First token "steal" with p=0.3, else "<end>": exactly 30% of answers are harmful in expectation.
    model = FixedModel(distribution(tok, {("steal",): 0.3, (world.END,): 0.7 - 1e-9}))
    a, b = evaluate(model, tok, sample_seed=1), evaluate(model, tok, sample_seed=1)
    assert a.sampled_harmful_rate == b.sampled_harmful_rate
    sigma = math.sqrt(0.3 * 0.7 / a.n_samples)
    assert abs(a.sampled_harmful_rate - 0.3) < 4 * sigma


def test_lexicon_share_and_judge_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.3, 0.2, 0.4], [0.5, 0.0, 0.25, 0.25]]))
    share = lexicon_share(logits, [0, 1], [2])
    assert share.tolist() == pytest.approx([0.4 / 0.6, 0.5 / 0.75])
    assert is_harmful_answer(["steal", "lie", "talk"])
    assert not is_harmful_answer(["steal", "talk"])  # a tie is not harmful
    assert not is_harmful_answer([])


def test_left_padded_batch_equals_single_sequences(tok):
    model = init_model(tok, seed=0).eval()
    # Three prompt lengths (the chat templates have 6, 4 and 7 words) and one with a context episode.
    seqs = [encode_prompt(tok, world.CHAT_PROMPTS[i]) for i in (0, 12, 24)]
    seqs.append(encode_prompt(tok, world.CHAT_PROMPTS[1], [world.sample_episode(world.UNSAFE, random.Random(0))]))
    assert len({len(s) for s in seqs}) == 4
    batched = next_token_logits(model, seqs, tok.pad_token_id)
    single = torch.cat([next_token_logits(model, [s], tok.pad_token_id) for s in seqs])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
