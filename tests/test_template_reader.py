"""The template-reader constraint (``orthoreg.reader.template``): modules, positions, and V against a hand-collected
float64 PCA of the inputs at the template's tokens."""

from __future__ import annotations

import pytest
import torch

from orthoreg import InputSubspacesError, extract_template_subspaces
from orthoreg.reader.template import template_reader_modules
from tests._directions_helpers import make_tokenizer, one_torch_thread  # noqa: F401 - autouse fixture
from tests.test_reader_extraction import MODULES, PROMPTS, REPLIES, SIMPLE_TEMPLATE, model, projector, reference_inputs

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_every_linear_module_but_the_first_layers():
    lm = model()
    expected = [f"model.layers.{i}.{part}.{p}" for i in (1, 2) for part, p in
                [("self_attn", p) for p in PROJECTIONS[:4]] + [("mlp", p) for p in PROJECTIONS[4:]]]
    assert sorted(template_reader_modules(lm)) == sorted(expected)
    assert sorted(template_reader_modules(lm, targets=["down_proj"])) == ["model.layers.1.mlp.down_proj",
                                                                          "model.layers.2.mlp.down_proj"]
    with pytest.raises(InputSubspacesError, match="matches targets"):
        template_reader_modules(lm, targets=["c_attn"])


def test_subspaces_are_the_top_pca_of_the_template_and_first_reply_inputs():
    lm = model()
    tok = make_tokenizer(chat_template=SIMPLE_TEMPLATE)
    got = extract_template_subspaces(lm, tok, PROMPTS, k=3, replies=REPLIES, batch_size=5)
    assert "model.layers.0.self_attn.q_proj" not in got and got.metadata["positions"] == ["post_instruction",
                                                                                          "first_reply"]
    inputs = reference_inputs(lm, PROMPTS, ["post_instruction", "first_reply"], REPLIES)
    for name in [m for m in MODULES if ".layers.0." not in m]:
        ref = torch.linalg.svd(inputs[name], full_matrices=False).Vh[:3]
        assert torch.dist(projector(got[name]), projector(ref)) < 1e-6, name


def test_a_tokenizer_without_a_chat_template_is_refused():
    with pytest.raises(InputSubspacesError, match="no chat template"):
        extract_template_subspaces(model(), make_tokenizer(chat_template=None), PROMPTS)
