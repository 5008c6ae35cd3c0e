"""extract_directions: planted-direction recovery, streaming invariants, options, metadata and every refusal.

Planted model (tests/_directions_helpers.py): harmful and harmless prompts differ in one token whose embeddings
differ by exactly ALPHA·v; the tiny blocks add only small updates, so the true harmful direction at every layer is
(almost) v. Tolerances: |cos| > 0.99 and principal angles < 5° are the issue's acceptance bars; observed values are
|cos| > 0.9996 and angles < 0.3°.
"""

import warnings

import pytest
import torch

from orthoreg.core.prompts import ContrastSet, PromptSetError
from orthoreg.directions.extraction import (
    ExtractionError,
    UnknownTokenWarning,
    encode_prompts,
    extract_directions,
    unknown_token_share,
)
from orthoreg.directions.harmful import DirectionsError
from tests._directions_helpers import (  # noqa: F401 - one_torch_thread is an autouse fixture
    SIMPLE_TEMPLATE,
    make_tokenizer,
    one_torch_thread,
    planted_model,
    planted_prompts,
    principal_angles_deg,
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def prompts():
    return planted_prompts()


# ----------------------------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("method", ["diff_means", "pca_diff"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_recovers_a_planted_direction(tok, prompts, method, pooling):
    model, v = planted_model(k=1)
    harmful, harmless, _ = prompts
    dirs = extract_directions(model, tok, harmful, harmless, k=1, method=method, pooling=pooling, progress=False)
    assert dirs.layers == [0, 1, 2]
    for layer in dirs.layers:
        cos = float(dirs[layer][0] @ v[0])
        assert cos > 0.99, f"layer {layer}: cos {cos:.4f}"  # signed: the direction points toward harmful


@pytest.mark.parametrize("method", ["pca_diff", "class_means"])
def test_recovers_a_planted_three_dimensional_subspace(tok, prompts, method):
    model, v = planted_model(k=3)  # activity i carries v[i % 3]; categories are "group{i % 3}"
    harmful, harmless, categories = prompts
    dirs = extract_directions(model, tok, harmful, harmless, k=3, method=method, pooling="mean",
                              categories=categories, paired=True, progress=False)
    for layer in dirs.layers:
        assert dirs[layer].shape == (3, 32)
        assert torch.allclose(dirs[layer] @ dirs[layer].T, torch.eye(3), atol=1e-5)
        angles = principal_angles_deg(dirs[layer], v)
        assert angles.max() < 5.0, f"layer {layer}: principal angles {angles.tolist()}"


def test_separation_statistics_on_held_out_prompts(tok, prompts):
    model, _ = planted_model(k=1)
    dirs = extract_directions(model, tok, *prompts[:2], pooling="mean", progress=False)
    meta = dirs.metadata
    assert meta["separation_split"] == "heldout" and meta["n_eval"] == 2 * int(72 * 0.2)
    assert meta["n_harmful"] + meta["n_eval"] // 2 == 72
    for layer in ("0", "1", "2"):
        stats = meta["separation"][layer]
        assert stats["accuracy"] == 1.0 and stats["d_prime"] > 3 and stats["gap_norm"] > 0


def test_explicit_heldout_set_and_contrast_set_input(tok, prompts):
    model, v = planted_model(k=1)
    harmful, harmless, categories = prompts
    train = ContrastSet(harmful[:48], harmless[:48], categories[:48], paired=True)
    test = ContrastSet(harmful[48:], harmless[48:])
    dirs = extract_directions(model, tok, train, heldout=test, pooling="mean", progress=False)
    assert dirs.metadata["n_harmful"] == 48 and dirs.metadata["n_eval"] == 48 and dirs.metadata["paired"]
    assert float(dirs[1][0] @ v[0]) > 0.99


def test_too_few_prompts_measure_separation_in_sample(tok):
    model, _ = planted_model(k=1)
    dirs = extract_directions(model, tok, ["please explain how to h1", "how to do h2 now"],
                              ["please explain how to b1", "how to do b2 now"], progress=False)
    assert dirs.metadata["separation_split"] == "train" and dirs.metadata["n_eval"] == 4


# ----------------------------------------------------------------------------------------------- streaming


def test_batch_size_does_not_change_the_result(tok, prompts):
    # Streaming sums must equal one big batch; different padding per batch size only changes float rounding.
    model, _ = planted_model(k=2)
    results = [extract_directions(model, tok, *prompts[:2], k=2, method="pca_diff", batch_size=b, heldout=0,
                                  progress=False) for b in (1, 7, 200)]
    for other in results[1:]:
        for layer in results[0].layers:
            assert torch.allclose(results[0][layer], other[layer], atol=2e-5)


def test_stops_after_the_deepest_needed_layer_and_cleans_up(tok, prompts):
    model, _ = planted_model(k=1)
    calls = []
    probe = model.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    head = model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    model.train()
    dirs = extract_directions(model, tok, *prompts[:2], layers=[0, 1], progress=False)
    assert dirs.layers == [0, 1]
    assert calls == [], "layer 2 and the LM head never ran"
    assert model.training, "train/eval mode restored"
    assert all(len(layer._forward_hooks) == (1 if i == 2 else 0) for i, layer in enumerate(model.model.layers))
    probe.remove()
    head.remove()


def test_layer_selection_forms(tok, prompts):
    model, _ = planted_model(k=1)
    assert extract_directions(model, tok, *prompts[:2], layers="last_half", progress=False).layers == [1, 2]
    assert extract_directions(model, tok, *prompts[:2], layers=-1, progress=False).layers == [2]
    with pytest.raises(ValueError, match="out of range"):
        extract_directions(model, tok, *prompts[:2], layers=5, progress=False)


def test_peft_wrapped_model(tok, prompts):
    from peft import LoraConfig, get_peft_model

    model, v = planted_model(k=1)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    dirs = extract_directions(peft_model, tok, *prompts[:2], pooling="mean", progress=False)
    assert float(dirs[0][0] @ v[0]) > 0.99


# ----------------------------------------------------------------------------------------------- metadata


def test_metadata(tok, prompts):
    model, _ = planted_model(k=1)
    dirs = extract_directions(model, tok, *prompts[:2], layers=[1], pooling="mean", progress=False,
                              source_revision="abc123")
    meta = dirs.metadata
    assert dirs.hidden_size == 32 and dirs.k == 1
    assert meta["model_type"] == "llama" and meta["num_layers"] == 3
    assert meta["method"] == "diff_means" and meta["pooling"] == "mean" and meta["source_revision"] == "abc123"
    assert meta["max_length"] == 64 and meta["chat_template"] is False
    assert meta["prompt_hash"].startswith("sha256:")
    assert set(meta["separation"]) == {"1"}
    other = extract_directions(model, tok, prompts[0][:-1], prompts[1][:-1], layers=[1], progress=False)
    assert other.metadata["prompt_hash"] != meta["prompt_hash"]


# ----------------------------------------------------------------------------------------------- tokenisation


def test_chat_template_is_applied_when_present(prompts):
    tok = make_tokenizer(chat_template=SIMPLE_TEMPLATE)
    ids = encode_prompts(tok, ["please explain how to h1"], chat_template=True, max_length=None, truncate=False)[0]
    expected = tok("user : please explain how to h1 assistant :", add_special_tokens=False)["input_ids"]
    assert ids == expected
    model, v = planted_model(k=1)
    dirs = extract_directions(model, tok, *prompts[:2], pooling="mean", progress=False)
    assert dirs.metadata["chat_template"] is True and float(dirs[0][0] @ v[0]) > 0.99
    raw = extract_directions(model, tok, *prompts[:2], pooling="mean", chat_template=False, progress=False)
    assert raw.metadata["chat_template"] is False and not torch.equal(raw[0], dirs[0])
    with pytest.raises(ExtractionError, match="no chat template"):
        extract_directions(model, make_tokenizer(), *prompts[:2], chat_template=True, progress=False)


def test_tokenizer_without_pad_token_falls_back(prompts):
    # Documented fallback: right padding with EOS (else 0); padded positions are masked and come after every real
    # token, so the result equals the one with a real pad token up to kernel rounding.
    model, _ = planted_model(k=1)
    no_pad = make_tokenizer(pad=False)
    assert no_pad.pad_token is None
    got = extract_directions(model, no_pad, *prompts[:2], progress=False)
    want = extract_directions(model, make_tokenizer(), *prompts[:2], progress=False)
    assert no_pad.pad_token is None, "the caller's tokenizer is not modified"
    for layer in want.layers:
        assert torch.allclose(got[layer], want[layer], atol=1e-6)


def test_overlong_prompts_raise_or_truncate_from_the_left(tok, prompts):
    model, _ = planted_model(k=1)
    harmful, harmless, _ = prompts
    with pytest.raises(ExtractionError, match="exceed max_length=5 tokens.*truncate=True"):
        extract_directions(model, tok, harmful, harmless, max_length=5, progress=False)
    with pytest.warns(UserWarning, match="kept the last 5 tokens"):
        dirs = extract_directions(model, tok, harmful, harmless, max_length=5, truncate=True, progress=False)
    assert dirs.metadata["max_length"] == 5
    full = tok("explain the thing about h1 to my friend")["input_ids"]
    with pytest.warns(UserWarning):
        cut = encode_prompts(tok, ["explain the thing about h1 to my friend"], chat_template=False, max_length=5,
                             truncate=True)[0]
    assert cut == full[-5:], "the end of the prompt (what pooling='last' reads) is kept"
    with pytest.raises(ExtractionError, match="exceeds the model's context length 64"):
        extract_directions(model, tok, harmful, harmless, max_length=65, progress=False)
    long_prompt = " ".join(["please"] * 70)
    with pytest.raises(ExtractionError, match="exceed max_length=64"):  # the model's context is the default limit
        extract_directions(model, tok, [long_prompt], ["please explain"], progress=False)


def test_unknown_token_share_counts_prompt_tokens_only(tok):
    # "please" and "explain" are in the vocabulary, "zzz" and "qqq" are not; BOS and the template are not counted.
    coverage = unknown_token_share(tok, ["please explain zzz qqq", "please zzz"])
    assert (coverage.n_tokens, coverage.n_unknown, coverage.unk_token) == (6, 3, "[UNK]")
    assert coverage.unknown_share == 0.5
    assert unknown_token_share(tok, ["please explain how to"]).unknown_share == 0.0


def test_tokenizer_without_an_unknown_token_covers_everything():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a tiny corpus"], vocab_size=300, min_frequency=1)
    byte_level = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    coverage = unknown_token_share(byte_level, ["words it never saw: ünïcödé"])
    assert coverage.n_tokens > 0 and coverage.n_unknown == 0


def test_extraction_warns_when_prompts_are_mostly_unknown_tokens(tok, prompts):
    model, _ = planted_model(k=1)
    harmful, harmless, _ = prompts
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownTokenWarning)  # known prompts: no warning
        extract_directions(model, tok, harmful[:12], harmless[:12], progress=False)
    # Each prompt gets three words the vocabulary lacks: 3 of 7-9 tokens unknown (> 20 %).
    foreign = [f"{p} zzz yyy xxx" for p in harmful[:12]], [f"{p} zzz yyy xxx" for p in harmless[:12]]
    with pytest.warns(UnknownTokenWarning, match=r"\d+ % of the tokens of the prompts \(72 of \d+\) are unknown"):
        extract_directions(model, tok, *foreign, progress=False)


def test_the_builtin_prompts_are_mostly_unknown_to_the_toy_vocabulary():
    from orthoreg.core.prompts import load_builtin
    from orthoreg.testbed.tokenizer import build_tokenizer

    builtin = load_builtin("train")
    coverage = unknown_token_share(build_tokenizer(), builtin.harmful + builtin.harmless)
    assert 0.70 < coverage.unknown_share < 0.72  # the 71 % of issue 16
    assert "--prompts FILE" in coverage.message()


# ----------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "harmful, harmless, kwargs, error, match",
    [
        ([], ["please explain how to b1"], {}, PromptSetError, "harmful prompt set is empty"),
        (["please explain how to h1"], [], {}, PromptSetError, "harmless prompt set is empty"),
        (["please explain how to h1"] * 3, ["please explain how to b1"], {}, PromptSetError, "unbalanced"),
        (["please explain how to h1"] * 3, ["please explain how to b1"] * 2, {"method": "pca_diff"}, PromptSetError,
         "equal counts"),
        (["please explain how to h1"], ["please explain how to b1"], {"k": 2}, ExtractionError,
         "diff_means' gives one direction"),
        (["please explain how to h1"], ["please explain how to b1"], {"k": 2, "method": "class_means"},
         ExtractionError, "at least k=2 harm categories"),
        (["please explain how to h1"], ["please explain how to b1"], {"method": "svd"}, ExtractionError,
         "`method` must be one of"),
        (["please explain how to h1"], ["please explain how to b1"], {"pooling": "max"}, ExtractionError,
         "`pooling` must be one of"),
        (["please explain how to h1"], ["please explain how to b1"], {"k": 0}, ExtractionError, "`k` must be"),
        (["please explain how to h1"], ["please explain how to b1"], {"heldout": 1.5}, ExtractionError,
         "`heldout` must be a fraction"),
        (["please explain how to h1"], ["please explain how to b1"], {"method": "pca_diff", "paired": False},
         ExtractionError, "needs paired prompts"),
    ],
)
def test_refusals(tok, harmful, harmless, kwargs, error, match):
    model, _ = planted_model(k=1)
    with pytest.raises(error, match=match):
        extract_directions(model, tok, harmful, harmless, progress=False, **kwargs)


def test_unbalanced_set_truncates_on_request(tok, prompts):
    model, v = planted_model(k=1)
    harmful, harmless, _ = prompts
    with pytest.warns(UserWarning, match="keeping the first 40"):
        dirs = extract_directions(model, tok, harmful, harmless[:40], balance="truncate", pooling="mean",
                                  progress=False)
    assert dirs.metadata["n_harmful"] + dirs.metadata["n_eval"] // 2 == 40
    assert float(dirs[0][0] @ v[0]) > 0.99


def test_rank_deficient_subspace_is_refused(tok):
    # Two distinct pairs, repeated: the paired differences span at most 2 dimensions, so k=3 cannot exist.
    model, _ = planted_model(k=3)
    harmful = ["please explain how to h0", "please explain how to h1"] * 4
    harmless = ["please explain how to b0", "please explain how to b1"] * 4
    with pytest.raises(DirectionsError, match="span only 2 dimension.*fewer than k=3.*rank-deficient"):
        extract_directions(model, tok, harmful, harmless, k=3, method="pca_diff", heldout=0, progress=False)


def test_identical_sets_have_no_direction(tok):
    model, _ = planted_model(k=1)
    same = ["please explain how to h0", "write a short story about b1"]
    with pytest.warns(UserWarning, match="appear in both sets"), pytest.raises(DirectionsError, match="same mean"):
        extract_directions(model, tok, same, list(same), progress=False)
