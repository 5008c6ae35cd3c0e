"""Structural layer discovery, layer selection and token masks."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from orthoreg.core.capture import (
    UnsupportedArchitectureError,
    find_decoder_stack,
    layer_hidden,
    resolve_layers,
    token_mask,
    unwrap_model,
)
from tests.models import FAMILIES, tiny_model

EXPECTED_PATHS = {
    "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "gemma": "model.layers",
    "gemma2": "model.layers", "phi3": "model.layers", "olmo": "model.layers", "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_finds_decoder_layers_of_every_family(family):
    model = tiny_model(family)
    stack = find_decoder_stack(model)
    assert stack.path == EXPECTED_PATHS[family]
    assert stack.num_layers == 3 and stack.hidden_size == 32
    assert stack.lm is model
    # The stack is the module whose forward runs the layers: its output is the final hidden state.
    outputs = {}
    # Hooks must return None: a forward hook's return value replaces the module's output.
    stack.stack.register_forward_hook(lambda m, a, o: outputs.update(stack=o))
    stack.layers[2].register_forward_hook(lambda m, a, o: outputs.update(last=layer_hidden(o)))
    model(torch.randint(3, 99, (2, 5)))
    assert outputs["last"].shape == (2, 5, 32)
    assert outputs["stack"][0].shape == (2, 5, 32)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_finds_layers_through_peft_and_ddp_like_wrappers(family):
    targets = {"llama": ["o_proj"], "gpt2": ["c_proj"], "gpt_neox": ["dense"]}[family]
    base = tiny_model(family)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=targets))

    class DistributedDataParallel(nn.Module):  # the wrapper's name is what unwrap_model keys on
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = DistributedDataParallel(peft_model)
    assert unwrap_model(wrapped) is base
    assert find_decoder_stack(wrapped).layers is find_decoder_stack(base).layers


def test_fsdp2_style_class_swap_is_still_homogeneous():
    model = tiny_model("llama")
    layers = model.model.layers
    fsdp_class = type("FSDPLlamaDecoderLayer", (type(layers[0]),), {})
    for layer in layers:  # fully_shard swaps each module's class for one cached dynamic subclass
        layer.__class__ = fsdp_class
    assert find_decoder_stack(model).layers is layers


def test_unknown_architecture_names_the_fix():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 4, "hidden_size": 8, "model_type": "odd"})()
            self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 8)])

    with pytest.raises(UnsupportedArchitectureError, match="layers_path"):
        find_decoder_stack(Odd())


def test_layers_path_override():
    model = tiny_model("llama")
    assert find_decoder_stack(model, layers_path="model.layers").path == "model.layers"
    with pytest.raises(UnsupportedArchitectureError, match="does not name an nn.ModuleList"):
        find_decoder_stack(model, layers_path="model.norm")


@pytest.mark.parametrize(
    "spec,n,expected",
    [
        (0, 12, [0]),
        (-1, 12, [11]),
        ([-1, 3, 3], 12, [3, 11]),
        ("all", 4, [0, 1, 2, 3]),
        ("last_third", 12, [8, 9, 10, 11]),
        ("middle_third", 12, [4, 5, 6, 7]),
        ("first_half", 5, [0, 1, 2]),
        ("2/3:", 30, list(range(20, 30))),
        ("0.25:0.5", 8, [2, 3]),
        ("last_third", 2, [1]),  # never empty
        ("-2", 4, [2]),
    ],
)
def test_resolve_layers(spec, n, expected):
    assert resolve_layers(spec, n) == expected


@pytest.mark.parametrize("spec,match", [(12, "out of range"), (-13, "out of range"), ("upper", "unknown layer"),
                                        ("0.5:0.2", "0 <= a < b <= 1"), (True, "bool")])
def test_resolve_layers_rejects(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_layers(spec, 12)


def test_mask_from_attention_and_labels():
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, 5, 6, -100], [-100, 7, -100, -100]])
    inputs = {"attention_mask": attention, "labels": labels}
    assert token_mask(inputs, (2, 4)).tolist() == attention.bool().tolist()
    assert token_mask(inputs, (2, 4), "labels").tolist() == [[False, True, True, False], [False, True, False, False]]


def test_prompt_end_mask_keeps_the_token_before_the_first_label():
    attention = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # right, left padded; no label
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, -100, -100, 7, 8], [-100, -100, -100, -100, -100]])
    mask = token_mask({"attention_mask": attention, "labels": labels}, (3, 5), "prompt_end")
    assert mask.tolist() == [[False, True, False, False, False], [False, False, True, False, False],
                             [False] * 5]


def test_prompt_end_mask_refuses_rows_without_a_prompt():
    labels = torch.tensor([[4, 5, 6], [-100, 5, 6]])  # plain LM labels on row 0: no prompt token before them
    with pytest.raises(ValueError, match="completion-only"):
        token_mask({"attention_mask": torch.ones(2, 3), "labels": labels}, (2, 3), "prompt_end")
    with pytest.raises(ValueError, match="mask='attention'"):
        token_mask({"attention_mask": torch.ones(1, 3)}, (1, 3), "prompt_end")


def test_mask_from_position_ids_of_padding_free_batch():
    # TRL padding-free: one row, sequences of length 3, 2, 1 packed, then right padding with position id 0.
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])
    mask = token_mask({"position_ids": position_ids}, (1, 8))
    assert mask.tolist() == [[True, True, True, True, True, True, False, False]]
    # No padding: everything counts.
    assert token_mask({"position_ids": torch.tensor([[0, 1, 0, 1, 2]])}, (1, 5)).all()


def test_mask_without_any_mask_counts_everything():
    assert token_mask({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, (2, 3)).all()


def test_label_policy_without_labels_names_the_fix():
    with pytest.raises(ValueError, match="mask='attention'"):
        token_mask({"attention_mask": torch.ones(1, 3)}, (1, 3), "labels")
