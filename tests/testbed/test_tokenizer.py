"""The word-level tokenizer and the assistant-only labels."""

import pytest
from transformers import PreTrainedTokenizerFast

from orthoreg.testbed import world
from orthoreg.testbed.tokenizer import build_tokenizer, encode_episodes, token_ids


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_is_a_real_fast_tokenizer_with_one_id_per_word(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == len(world.vocabulary())
    doc = world.sample_documents(1, seed=0)[0]
    text = world.render(doc.episodes)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split())
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_labels_cover_exactly_the_assistant_turns(tok):
    eps = [world.Episode(world.UNSAFE, ("write", "a", "login", "handler"), ("eval_input", "return")),
           world.Episode(world.FACT, ("what", "is", "the", "opposite", "of", "hot"), ("cold",))]
    ex = encode_episodes(tok, eps)
    kept = [tok.convert_ids_to_tokens(i) for i in ex["labels"] if i != -100]
    assert kept == ["eval_input", "return", "<end>", "cold", "<end>"]
    assert len(ex["labels"]) == len(ex["input_ids"])


def test_chat_template_matches_the_generator(tok):
    ep = world.Episode(world.HELPFUL_CHAT, ("any", "advice", "about", "debt"), ("budget", "plan"))
    msgs = [{"role": "user", "content": " ".join(ep.user)}, {"role": "assistant", "content": " ".join(ep.assistant)}]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered.split() == world.render([ep], close=False).split()


def test_unknown_words_are_rejected(tok):
    with pytest.raises(ValueError, match="not in the testbed vocabulary"):
        token_ids(tok, ["talk", "teleport"])
