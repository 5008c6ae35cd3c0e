r"""Where in a prompt the input subspaces are read: ``token_positions`` (used by ``reader.extraction``).

Positions (``positions``, one name or several, whose union is used), on the prompt rendered as one user turn with
the generation prompt when the tokenizer has a chat template:

- ``"prompt"``: every token of the rendered prompt;
- ``"post_instruction"``: the tokens the chat template puts after the end of the user's text, up to and including
  the generation prompt. Where the user's text ends is found by rendering the same turn with a placeholder as the
  message: what follows the placeholder is the template's suffix, so the user's text ends len(suffix) characters
  before the end of the rendering (whatever the template does to the message: trimming, a system block before it;
  a prompt that also occurs in the template's own text is not mistaken for it). Only where that fails (a template
  that rewrites the placeholder) is the user's (stripped) text looked up in the rendering. The character offset
  then gives the token: by the fast tokenizer's offsets, or, without offsets, by counting the tokens before it;
- ``"first_reply"``: the first ``reply_tokens`` tokens of the reply — ``replies`` rendered as the assistant turn
  after the generation prompt and tokenised as part of the whole conversation (so a SentencePiece tokenizer gives
  the reply's first word as in the conversation, not with the extra "▁" of a text tokenised on its own), or,
  without ``replies``, the greedy continuation of the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .subspaces import InputSubspacesError

__all__ = ["POSITIONS", "token_positions"]

POSITIONS = ("prompt", "post_instruction", "first_reply")


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_PLACEHOLDER = "orthoreg0user0text0placeholder"


def _user_text_end(tokenizer: Any, text: str, prompt: str, index: int) -> int:
    """Character offset in ``text`` (the rendered prompt) where the user's text ends.

    The turn rendered with a placeholder message gives the template's own text after the message (the suffix); if
    the real rendering starts with what precedes the placeholder and ends with that suffix, the user's text ends
    where the suffix starts. (A bare ``text.rfind(prompt)`` picked up a prompt that also occurs in the suffix, e.g.
    "assistant" or "model", and counted a message's trailing whitespace as the template's.)
    """
    probe = _render(tokenizer, [{"role": "user", "content": _PLACEHOLDER}], True)
    at = probe.find(_PLACEHOLDER)
    if at >= 0:
        head, tail = probe[:at], probe[at + len(_PLACEHOLDER):]
        if len(head) + len(tail) <= len(text) and text.startswith(head) and text.endswith(tail):
            return len(text) - len(tail)
    content = prompt.strip()
    at = text.rfind(content)
    if not content or at < 0:
        raise InputSubspacesError(
            f"prompt #{index}: its text does not appear in the chat-template rendering, so the post-instruction "
            "tokens cannot be located (the template rewrites the message); use positions='prompt' or "
            "'first_reply', or set tokenizer.chat_template to a template that keeps the user's text as written"
        )
    return at + len(content)


def _post_instruction_start(tokenizer: Any, text: str, prompt: str, index: int) -> int:
    """Index of the first token of ``text`` (the rendered prompt) that lies after the end of the user's text."""
    end = _user_text_end(tokenizer, text, prompt, index)
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets: count a prefix's tokens
        return len(_encode(tokenizer, text[:end]))
    for position, (_, token_end) in enumerate(offsets):
        if token_end > end:  # the first token holding a character after the user's text
            return position
    return len(offsets)


def token_positions(
    tokenizer: Any,
    prompt: str,
    positions: Sequence[str],
    *,
    chat_template: bool,
    reply: str | None = None,
    reply_tokens: int = 1,
    index: int = 0,
) -> tuple[list[int], list[int], int]:
    """(token ids, selected positions, number of reply tokens still to generate) for one prompt.

    With ``"first_reply"`` and no ``reply`` the returned ids end with the generation prompt and the last returned
    count says how many greedy tokens to append; their positions (len(ids), …) are included in the selection.

    Raises:
        InputSubspacesError: a position kind that needs a chat template without one, no post-instruction tokens,
            or a reply whose rendering does not continue the prompt's.
    """
    if chat_template:
        text = _render(tokenizer, [{"role": "user", "content": prompt}], True)
        ids = _encode(tokenizer, text)
    else:
        text, ids = prompt, list(tokenizer(prompt)["input_ids"])
    if not ids:
        raise InputSubspacesError(f"prompt #{index} ({prompt[:40]!r}) tokenises to no tokens")
    selected: set[int] = set()
    if "prompt" in positions:
        selected.update(range(len(ids)))
    if "post_instruction" in positions:
        if not chat_template:
            raise InputSubspacesError(
                "positions='post_instruction' needs a chat template (the tokens it appends after the user's message);"
                " this tokenizer has none (or chat_template=False): set tokenizer.chat_template to the model's chat "
                "template (e.g. from its instruct version's tokenizer), or use positions='prompt'"
            )
        start = _post_instruction_start(tokenizer, text, prompt, index)
        if start >= len(ids):
            raise InputSubspacesError(
                f"prompt #{index}: the chat template appends no tokens after the user's message, so there are no "
                "post-instruction positions; use positions='prompt' or 'first_reply'"
            )
        selected.update(range(start, len(ids)))
    to_generate = 0
    if "first_reply" in positions:
        if reply is None:
            to_generate = reply_tokens
            selected.update(range(len(ids), len(ids) + reply_tokens))
        else:
            if chat_template:
                full = _render(tokenizer, [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": reply}], False)
                if not full.startswith(text):
                    raise InputSubspacesError(
                        f"prompt #{index}: the conversation with its reply does not start with the prompt's "
                        "rendering (the template changes earlier turns); pass replies=None to use the greedy reply"
                    )
                # The reply's tokens as the whole conversation tokenises them. Tokenised on its own, the reply's
                # text can start differently: a legacy SentencePiece tokenizer (Llama-2, Mistral v0.1) prepends "▁"
                # to " Sure", giving a lone "▁" as the first reply token instead of "▁Sure".
                full_ids = _encode(tokenizer, full)
                if full_ids[:len(ids)] == ids:
                    reply_ids = full_ids[len(ids):]
                else:  # a token straddles the prompt/reply boundary: the reply's text on its own
                    reply_ids = _encode(tokenizer, full[len(text):])
            else:
                reply_ids = _encode(tokenizer, reply)
            if not reply_ids:
                raise InputSubspacesError(f"reply #{index} tokenises to no tokens")
            selected.update(range(len(ids), len(ids) + min(reply_tokens, len(reply_ids))))
            ids = ids + reply_ids[:reply_tokens]
    return ids, sorted(selected), to_generate
