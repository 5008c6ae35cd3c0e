"""HarmfulDirections: orthonormalisation, the safetensors format (bit-exact round trip) and every refusal on load."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import MistralConfig, MistralForCausalLM

from orthoreg.directions.harmful import DirectionsError, HarmfulDirections
from tests._directions_helpers import (  # noqa: F401 - one_torch_thread is an autouse fixture
    make_tokenizer,
    one_torch_thread,
    planted_model,
    planted_prompts,
)

META = {"source_model": "tiny", "model_type": "llama", "num_layers": 3}


def _random_directions(k=2, d=32, layers=(0, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return HarmfulDirections({i: torch.randn(k, d, generator=g) for i in layers}, metadata=META)


def _write(path, tensors, meta):
    save_file(tensors, str(path), metadata=None if meta is None else {"orthoreg": meta})


# ----------------------------------------------------------------------------------------------- construction


def test_qr_orthonormalises_and_keeps_span_and_orientation():
    raw = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    u = HarmfulDirections({1: raw})[1]
    assert torch.allclose(u @ u.T, torch.eye(3), atol=1e-6)
    # Same row space: projecting the raw rows onto span(u) changes nothing.
    assert torch.allclose(raw @ u.T @ u, raw, atol=1e-5)
    assert (u * raw).sum(dim=1)[0] > 0, "first row keeps the first raw row's orientation"


@pytest.mark.parametrize(
    "tensor, match",
    [
        (torch.tensor([[1.0, 0, 0], [2.0, 0, 0]]), "rank-deficient"),
        (torch.zeros(1, 8), "rank-deficient"),
        (torch.tensor([[float("nan"), 1.0]]), "NaN or Inf"),
        (torch.randn(5, 4), "need 1 <= k <= d"),
        (torch.randn(2, 3, 4), r"must be a \(k, d\) matrix"),
    ],
)
def test_degenerate_directions_are_refused(tensor, match):
    with pytest.raises(DirectionsError, match=match):
        HarmfulDirections({0: tensor})


# ----------------------------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact(tmp_path):
    dirs = _random_directions()
    dirs.save(tmp_path / "d.safetensors")
    back = HarmfulDirections.load(tmp_path / "d.safetensors")
    assert back.layers == dirs.layers and back.hidden_size == dirs.hidden_size and back.k == dirs.k
    for layer in dirs.layers:
        assert back[layer].dtype == torch.float32
        assert torch.equal(back[layer], dirs[layer])  # bit-exact, not merely close
    assert back.metadata == dirs.metadata


def test_round_trip_of_extracted_directions_keeps_all_metadata(tmp_path):
    from orthoreg.directions.extraction import extract_directions

    model, _ = planted_model(1)
    harmful, harmless, _ = planted_prompts(4)
    dirs = extract_directions(model, make_tokenizer(), harmful, harmless, progress=False)
    dirs.save(tmp_path / "d.safetensors")
    back = HarmfulDirections.load(tmp_path / "d.safetensors", model=model)
    assert all(torch.equal(back[i], dirs[i]) for i in dirs.layers)
    assert back.metadata == dirs.metadata
    assert set(back.metadata["separation"]) == {"0", "1", "2"}


def test_file_is_safetensors_not_pickle(tmp_path):
    _random_directions().save(tmp_path / "d.safetensors")
    raw = (tmp_path / "d.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])  # a safetensors file is an 8-byte length + a JSON header
    meta = json.loads(header["__metadata__"]["orthoreg"])
    assert meta["format_version"] == 1 and meta["layers"] == [0, 2] and meta["k"] == 2 and meta["hidden_size"] == 32
    assert not raw.startswith(b"PK") and b"\x80\x04" not in raw[:2]  # neither a zip (torch.save) nor a pickle


def test_save_is_atomic_over_an_existing_file(tmp_path):
    path = tmp_path / "d.safetensors"
    _random_directions(seed=0).save(path)
    _random_directions(seed=1).save(path)
    assert list(tmp_path.iterdir()) == [path], "no temporary file left behind"
    assert torch.equal(HarmfulDirections.load(path)[0], _random_directions(seed=1)[0])


# ----------------------------------------------------------------------------------------------- refusals on load


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="orthoreg directions extract"):
        HarmfulDirections.load("/nonexistent/harmful.safetensors")


def test_corrupt_files(tmp_path):
    (tmp_path / "noise.safetensors").write_bytes(b"\x13\x00\x00\x00garbage" * 10)
    with pytest.raises(DirectionsError, match="not a readable safetensors file"):
        HarmfulDirections.load(tmp_path / "noise.safetensors")

    _random_directions().save(tmp_path / "good.safetensors")
    raw = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 40])  # truncated: tensor data missing
    with pytest.raises(DirectionsError, match="not a readable safetensors file"):
        HarmfulDirections.load(tmp_path / "cut.safetensors")


ORTHO = torch.eye(2, 32)


@pytest.mark.parametrize(
    "tensors, meta, match",
    [
        ({"layer.0": ORTHO}, None, "without orthoreg directions metadata"),
        ({"layer.0": ORTHO}, "{not json", "corrupt orthoreg metadata"),
        ({"layer.0": ORTHO}, "[1, 2]", "expected a JSON object"),
        ({"layer.0": ORTHO}, json.dumps({"format_version": 99}), "directions format 99"),
        ({"layer.0": ORTHO}, json.dumps({"format_version": 1, "layers": [0]}), "needs an int `hidden_size`"),
        ({"layer.0": ORTHO}, json.dumps({"format_version": 1, "hidden_size": 32, "layers": [0, 1]}),
         r"tensors for layers \[0\] but metadata says \[0, 1\]"),
        ({"weights": ORTHO}, json.dumps({"format_version": 1, "hidden_size": 32, "layers": []}),
         "unexpected tensor 'weights'"),
        ({"layer.0": 2 * ORTHO}, json.dumps({"format_version": 1, "hidden_size": 32, "layers": [0]}),
         "not orthonormal"),
        ({"layer.0": ORTHO}, json.dumps({"format_version": 1, "hidden_size": 48, "layers": [0]}), "not orthonormal"),
        ({"layer.0": torch.ones(2, 2, 8)}, json.dumps({"format_version": 1, "hidden_size": 8, "layers": [0]}),
         "not orthonormal"),
    ],
)
def test_malformed_files_are_refused(tmp_path, tensors, meta, match):
    path = tmp_path / "bad.safetensors"
    _write(path, tensors, meta)
    with pytest.raises(DirectionsError, match=match):
        HarmfulDirections.load(path)


# ----------------------------------------------------------------------------------------------- another model


@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: planted_model(1, hidden_size=48, num_attention_heads=4)[0], "hidden size is 48"),
        (lambda: planted_model(1, num_hidden_layers=2)[0], "only 2 decoder layers"),
        (lambda: planted_model(1, num_hidden_layers=4)[0], "model with 3 layers; this model has 4"),
        (lambda: MistralForCausalLM(MistralConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                  num_key_value_heads=2, intermediate_size=37, vocab_size=99)),
         "extracted from a 'llama' model"),
    ],
)
def test_file_from_another_model_is_refused(tmp_path, other, match):
    model, _ = planted_model(1)
    dirs = _random_directions(layers=(0, 2))
    dirs.save(tmp_path / "d.safetensors")
    HarmfulDirections.load(tmp_path / "d.safetensors", model=model)  # its own model: accepted
    with pytest.raises(DirectionsError, match=match):
        HarmfulDirections.load(tmp_path / "d.safetensors", model=other())
