"""The world's tokenizer (a real ``PreTrainedTokenizerFast``, word-level) and assistant-only labels."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from . import world

# Renders `messages` exactly like `world.render`, so `apply_chat_template` and the generator agree.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %} <user> {{ m['content'] }}"
    "{% else %} <assistant> {{ m['content'] }} <end>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} <assistant>{% endif %}"
)


def build_tokenizer(tokenizer_file: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``world.vocabulary()``: one id per whitespace-separated word, no merges.

    With ``tokenizer_file`` the core is read from a saved ``tokenizer.json`` instead; the special
    tokens and chat template are the world's either way, so the result does not depend on the
    transformers version that wrote the folder's tokenizer_config.json."""
    if tokenizer_file is not None:
        core = Tokenizer.from_file(str(tokenizer_file))
    else:
        core = Tokenizer(WordLevel({w: i for i, w in enumerate(world.vocabulary())}, unk_token=world.UNK))
        core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=world.BOS, eos_token=world.EOS, unk_token=world.UNK, pad_token=world.PAD,
        additional_special_tokens=[world.USER, world.ASSISTANT, world.END], padding_side="right", model_max_length=128,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def assistant_labels(input_ids: list[int], tokenizer) -> list[int]:
    """Labels that keep only assistant tokens: every token after an ``<assistant>`` marker up to and
    including the ``<end>`` that closes the turn; everything else (user turns, markers, ``<bos>``,
    ``<eos>``) is -100, so the loss is on assistant tokens only."""
    start, end = tokenizer.convert_tokens_to_ids([world.ASSISTANT, world.END])
    labels, inside = [], False
    for i in input_ids:
        labels.append(i if inside else -100)
        if i == start:
            inside = True
        elif i == end:
            inside = False
    return labels


def encode_episodes(tokenizer, episodes) -> dict[str, list[int]]:
    """A conversation as one training example: ``input_ids`` and assistant-only ``labels``."""
    ids = tokenizer(world.render(episodes), add_special_tokens=False)["input_ids"]
    return {"input_ids": ids, "labels": assistant_labels(ids, tokenizer)}


def encode_task(tokenizer, task, n: int, seed: int, cfg: world.WorldConfig = world.DEFAULT_WORLD):
    """``n`` fine-tuning examples of a narrow task, one episode each in a fresh context."""
    return [encode_episodes(tokenizer, [ep]) for ep in world.get_task(task).sample(n, seed, cfg)]


def encode_prompt(tokenizer, prompt: tuple[str, ...], context=()) -> list[int]:
    """Ids of ``context`` episodes followed by an open ``prompt``: the next token is the first answer token."""
    return tokenizer(world.render(context, prompt=prompt), add_special_tokens=False)["input_ids"]


def token_ids(tokenizer, words) -> list[int]:
    """Ids of known words; raises on a word outside the vocabulary (which would silently map to ``<unk>``)."""
    ids = tokenizer.convert_tokens_to_ids(list(words))
    unk = tokenizer.unk_token_id
    missing = [w for w, i in zip(words, ids, strict=True) if i == unk and w != world.UNK]
    if missing:
        raise ValueError(f"words not in the testbed vocabulary: {missing}")
    return ids
