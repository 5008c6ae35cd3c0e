"""``extract_input_subspaces`` against a float64 reference collected here by hand, and the ``InputSubspaces`` file.

The reference encodes each templated prompt itself (word-level tokenizer: one token per word), runs it alone through
the model, reads each module's input with its own pre-hook at positions counted from the template's words, and takes
the top-k right singular vectors of the stacked inputs (PCA) or the eigenvectors of M_c⁻¹ M_p (contrastive) — other
algorithms than the library's eigh / Cholesky. Subspaces are compared by their projectors (1e-6: float64 vs float64
statistics of the same float32 activations, ~1e-12).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from orthoreg.reader.extraction import extract_input_subspaces, input_moments
from orthoreg.reader.positions import token_positions
from orthoreg.reader.subspaces import CARD_NAME, InputSubspaces, InputSubspacesError
from tests._directions_helpers import (  # noqa: F401 - one_torch_thread is an autouse fixture
    SIMPLE_TEMPLATE,
    WORDS,
    make_tokenizer,
    one_torch_thread,
    planted_prompts,
    tiny_config,
)

MODULES = ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
VOCAB = {w: i for i, w in enumerate(WORDS)}
PROMPTS = planted_prompts(6)[0][:24]
CONTRAST = planted_prompts(6)[1][:24]
REPLIES = ["reply to my friend", "a short story", "write the list now", "the thing"] * 6


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat_template=SIMPLE_TEMPLATE)


def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def reference_inputs(lm, prompts, positions, replies=None, greedy=False):
    """{module: (N, d_in) float64} inputs at hand-counted positions of the SIMPLE_TEMPLATE rendering."""
    rows = {m: [] for m in MODULES}
    for i, prompt in enumerate(prompts):
        words = ["user", ":"] + prompt.split() + ["assistant", ":"]
        selected = []
        if "prompt" in positions:
            selected += list(range(len(words)))
        if "post_instruction" in positions:
            selected += [len(words) - 2, len(words) - 1]  # "assistant :"
        if "first_reply" in positions:
            if greedy:
                with torch.no_grad():
                    logits = lm(input_ids=torch.tensor([[VOCAB[w] for w in words]])).logits
                words = words + [WORDS[int(logits[0, -1].argmax())]]
            else:
                words = words + replies[i].split()[:1]
            selected.append(len(words) - 1)
        seen = {}
        handles = [lm.get_submodule(m).register_forward_pre_hook(
            lambda mod, args, m=m, seen=seen: seen.__setitem__(m, args[0][0].double())) for m in MODULES]
        with torch.no_grad():
            lm(input_ids=torch.tensor([[VOCAB[w] for w in words]]))
        for h in handles:
            h.remove()
        for m in MODULES:
            rows[m].append(seen[m][sorted(set(selected))])
    return {m: torch.cat(r) for m, r in rows.items()}


def projector(v):
    v = v.double()
    return v.T @ v


@pytest.mark.parametrize("positions", ["prompt", "post_instruction", ("post_instruction", "first_reply")])
def test_pca_equals_a_hand_collected_float64_pca(tok, positions):
    lm = model()
    k = 2 if positions == "post_instruction" else 3  # layer 0 reads only the two template tokens' embeddings there
    got = extract_input_subspaces(lm, tok, PROMPTS, modules=MODULES, k=k, positions=positions, replies=REPLIES,
                                  batch_size=5)
    kinds = [positions] if isinstance(positions, str) else list(positions)
    inputs = reference_inputs(lm, PROMPTS, kinds, REPLIES)
    for name in MODULES:
        x = inputs[name]
        ref = torch.linalg.svd(x, full_matrices=False).Vh[:k]  # uncentred: no mean removed
        assert torch.dist(projector(got[name]), projector(ref)) < 1e-6, name
        assert got[name].dtype == torch.float32 and got[name].shape == (k, x.shape[1])
    assert got.metadata["num_positions"] == inputs[MODULES[0]].shape[0]
    assert got.metadata["positions"] == kinds and got.metadata["method"] == "pca"


def test_input_moments_equal_hand_collected_float64_second_moments(tok):
    lm = model()
    positions = ("post_instruction", "first_reply")
    moments, n = input_moments(lm, tok, PROMPTS, modules=MODULES, positions=positions, replies=REPLIES, batch_size=5)
    inputs = reference_inputs(lm, PROMPTS, list(positions), REPLIES)
    assert n == inputs[MODULES[0]].shape[0] and sorted(moments) == sorted(MODULES)
    for name in MODULES:
        x = inputs[name]
        reference = x.T @ x / x.shape[0]
        assert moments[name].dtype == torch.float64
        # float32 activations of a batch of five vs one prompt at a time: equal to ~1e-7 relative
        assert torch.allclose(moments[name], reference, rtol=1e-5, atol=1e-8 * float(reference.abs().max())), name
    with pytest.raises(InputSubspacesError, match="3 replies for 24 prompts"):
        input_moments(lm, tok, PROMPTS, modules=MODULES, positions="first_reply", replies=REPLIES[:3])
    with pytest.raises(InputSubspacesError, match="`prompts` is empty"):
        input_moments(lm, tok, [], modules=MODULES)
    with pytest.raises(InputSubspacesError, match="positions"):
        input_moments(lm, tok, PROMPTS, modules=MODULES, positions="everywhere")


def test_greedy_first_reply_and_contrastive_against_references(tok):
    lm = model()
    k = 2
    got = extract_input_subspaces(lm, tok, PROMPTS, modules=MODULES, k=k, positions="first_reply", batch_size=7)
    inputs = reference_inputs(lm, PROMPTS, ["first_reply"], greedy=True)
    for name in MODULES:
        ref = torch.linalg.svd(inputs[name], full_matrices=False).Vh[:k]
        assert torch.dist(projector(got[name]), projector(ref)) < 1e-6, name
    eps = 1e-2
    got = extract_input_subspaces(lm, tok, PROMPTS, modules=MODULES, k=k, positions="prompt", method="contrastive",
                                  contrast_prompts=CONTRAST, regularization=eps)
    xp, xc = reference_inputs(lm, PROMPTS, ["prompt"]), reference_inputs(lm, CONTRAST, ["prompt"])
    for name in MODULES:
        mp = xp[name].T @ xp[name] / xp[name].shape[0]
        mc = xc[name].T @ xc[name] / xc[name].shape[0]
        d = mc.shape[0]
        values, vectors = torch.linalg.eig(torch.linalg.solve(mc + eps * torch.trace(mc) / d * torch.eye(d), mp))
        order = values.real.argsort(descending=True)[:k]
        ref = torch.linalg.qr(vectors.real[:, order]).Q.T
        assert torch.dist(projector(got[name]), projector(ref)) < 1e-6, name


def test_a_peft_model_is_read_with_its_adapter_disabled_under_base_names(tok):
    lm = model()
    base = extract_input_subspaces(lm, tok, PROMPTS, modules=["mlp.up_proj"], k=2, positions="post_instruction")
    peft = get_peft_model(model(), LoraConfig(r=2, target_modules=["up_proj", "gate_proj"], init_lora_weights=False))
    wrapped = extract_input_subspaces(peft, tok, PROMPTS, modules=["mlp.up_proj"], k=2, positions="post_instruction")
    assert base.names == wrapped.names == [f"model.layers.{i}.mlp.up_proj" for i in range(3)]
    for name in base.names:
        assert torch.dist(projector(base[name]), projector(wrapped[name])) < 1e-6


def test_positions_of_the_template(tok):
    ids, selected, to_generate = token_positions(tok, "please explain how to b0", ["post_instruction"],
                                                 chat_template=True)
    assert [WORDS[i] for i in ids] == "user : please explain how to b0 assistant :".split()
    assert selected == [7, 8] and to_generate == 0
    ids, selected, _ = token_positions(tok, "how to b1", ["first_reply"], chat_template=True, reply="the thing",
                                       reply_tokens=2)
    assert [WORDS[i] for i in ids[-2:]] == ["the", "thing"] and selected == [len(ids) - 2, len(ids) - 1]
    plain = make_tokenizer()  # no chat template
    with pytest.raises(InputSubspacesError, match="needs a chat template"):
        token_positions(plain, "how to b1", ["post_instruction"], chat_template=False)


def test_bad_options_are_refused(tok):
    lm = model()
    with pytest.raises(InputSubspacesError, match="positions"):
        extract_input_subspaces(lm, tok, PROMPTS, modules=MODULES, positions="everywhere")
    with pytest.raises(InputSubspacesError, match="contrast_prompts"):
        extract_input_subspaces(lm, tok, PROMPTS, modules=MODULES, method="contrastive")
    with pytest.raises(InputSubspacesError, match="matches no linear module"):
        extract_input_subspaces(lm, tok, PROMPTS, modules=["mlp.nonexistent"])
    with pytest.raises(InputSubspacesError, match="fewer than k=8"):  # 3 prompts × 2 positions = 6 rows
        extract_input_subspaces(lm, tok, PROMPTS[:3], modules=MODULES, k=8, positions="post_instruction")


# ----------------------------------------------------------------------------------------------- the container
def test_orthonormalised_on_construction_and_peft_names_mapped():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(3, 32, generator=g)
    s = InputSubspaces({"base_model.model.model.layers.0.mlp.up_proj.base_layer": raw})
    v = s["model.layers.0.mlp.up_proj"]
    assert s.names == ["model.layers.0.mlp.up_proj"]
    assert torch.allclose(v.double() @ v.double().T, torch.eye(3, dtype=torch.float64), atol=1e-6)
    assert torch.dist(projector(v), projector(torch.linalg.qr(raw.double().T).Q.T)) < 1e-6  # same span
    with pytest.raises(InputSubspacesError, match="NaN"):
        InputSubspaces({"a.b": torch.full((2, 4), float("nan"))})
    with pytest.raises(InputSubspacesError, match=r"\(k, d\)"):
        InputSubspaces({"a.b": torch.zeros(2, 3, 4)})
    with pytest.raises(InputSubspacesError, match="rank-deficient"):
        InputSubspaces({"a.b": torch.ones(2, 4)})


def test_files_round_trip_and_refuse_bad_input(tmp_path):
    lm = model()
    g = torch.Generator().manual_seed(1)
    s = InputSubspaces({"model.layers.0.mlp.down_proj": torch.randn(2, 37, generator=g),
                        "model.layers.1.self_attn.q_proj": torch.randn(4, 32, generator=g)},
                       metadata={"source_model": "tiny", "method": "pca", "positions": ["prompt"]})
    s.save(tmp_path / "v.safetensors")
    back = InputSubspaces.load(tmp_path / "v.safetensors", model=lm)
    assert back.names == s.names and all(torch.equal(back[n], s[n]) for n in s.names)
    assert back.metadata == s.metadata
    s.save_pretrained(tmp_path / "folder")
    card = json.loads((tmp_path / "folder" / CARD_NAME).read_text())
    assert card["modules"]["model.layers.0.mlp.down_proj"] == {"k": 2, "in_features": 37} and card["k"] == 4
    again = InputSubspaces.from_pretrained(tmp_path / "folder", model=lm)
    assert all(torch.equal(again[n], s[n]) for n in s.names)
    with pytest.raises(FileNotFoundError, match="no input-subspaces file"):
        InputSubspaces.load(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        InputSubspaces.from_pretrained(tmp_path)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputSubspacesError, match="without orthoreg input-subspaces metadata"):
        InputSubspaces.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputSubspacesError, match="not a readable safetensors"):
        InputSubspaces.load(tmp_path / "junk.safetensors")
    wide = InputSubspaces({"model.layers.0.mlp.up_proj": torch.randn(2, 37, generator=g)})
    wide.save(tmp_path / "wide.safetensors")
    with pytest.raises(InputSubspacesError, match=r"up_proj.*37 wide.*reads 32"):
        InputSubspaces.load(tmp_path / "wide.safetensors", model=lm)
