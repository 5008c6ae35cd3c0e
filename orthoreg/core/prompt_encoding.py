"""Prompts → token ids for extraction: the chat template, length limits, the pad id, and how much of a prompt set
the tokenizer knows.

``unknown_token_share`` counts the prompt tokens that the tokenizer maps to its unknown token. A word-level or
small-vocabulary tokenizer given prompts in another language (the built-in English prompts on the toy world's
169-word vocabulary are 71 % ``<unk>``) turns most of every prompt into the same id, and a "harmful direction"
extracted from such prompts separates where the few known words sit, not harmfulness. Above
``UNKNOWN_TOKEN_WARN_SHARE`` extraction warns (``UnknownTokenWarning``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .capture import unwrap_model

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# More unknown prompt tokens than this share means the prompts are not in the tokenizer's vocabulary.
UNKNOWN_TOKEN_WARN_SHARE = 0.2


class ExtractionError(ValueError):
    """Extraction cannot run with these inputs (prompt too long, bad option, missing chat template, …)."""


class UnknownTokenWarning(UserWarning):
    """Many prompt tokens are unknown to the tokenizer: the prompts are not in the model's vocabulary."""


@dataclass(frozen=True)
class TokenCoverage:
    """How many prompt tokens a tokenizer maps to its unknown token (special tokens and templates not counted)."""

    n_tokens: int
    n_unknown: int
    unk_token: str | None

    @property
    def unknown_share(self) -> float:
        return self.n_unknown / self.n_tokens if self.n_tokens else 0.0

    def message(self, source: str = "the prompts") -> str:
        return (
            f"{100 * self.unknown_share:.0f} % of the tokens of {source} ({self.n_unknown} of {self.n_tokens}) are "
            f"unknown to the tokenizer ({self.unk_token!r}): the prompts are not in this model's vocabulary, so the "
            "directions would separate where the few known words sit, not harmfulness. Use prompts the tokenizer "
            "covers (CLI: --prompts FILE, or --harmful-file/--harmless-file)"
        )


def unknown_token_share(tokenizer: Any, prompts: Sequence[str]) -> TokenCoverage:
    """Counts the tokens of ``prompts`` (raw text, no special tokens, no chat template) that ``tokenizer`` maps to
    its unknown token. A tokenizer without one (byte-level BPE: GPT-2, Llama 3, SmolLM2) covers every text: 0
    unknown."""
    unk_id = getattr(tokenizer, "unk_token_id", None)
    if not prompts:
        return TokenCoverage(0, 0, getattr(tokenizer, "unk_token", None))
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    n_tokens = sum(len(ids) for ids in encoded)
    n_unknown = 0 if unk_id is None else sum(int(i == unk_id) for ids in encoded for i in ids)
    return TokenCoverage(n_tokens, n_unknown, getattr(tokenizer, "unk_token", None))


def warn_if_unknown_tokens(tokenizer: Any, prompts: Sequence[str], source: str = "the prompts") -> TokenCoverage:
    """``unknown_token_share``, with an ``UnknownTokenWarning`` above ``UNKNOWN_TOKEN_WARN_SHARE``."""
    coverage = unknown_token_share(tokenizer, prompts)
    if coverage.unknown_share > UNKNOWN_TOKEN_WARN_SHARE:
        warnings.warn(coverage.message(source), UnknownTokenWarning, stacklevel=3)
    return coverage


def model_context_length(model: nn.Module) -> int | None:
    """The model's maximum sequence length from its config, or ``None`` when the config does not say."""
    config = getattr(unwrap_model(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    chat_template: bool,
    max_length: int | None,
    truncate: bool,
    what: str = "prompt",
) -> list[list[int]]:
    """Token ids of each prompt, as a user turn with the generation prompt when ``chat_template``.

    Over-long prompts (more than ``max_length`` tokens) raise, or with ``truncate=True`` keep their *last*
    ``max_length`` tokens: the end of a prompt (and the generation prompt) is what ``pooling="last"`` reads.

    Raises:
        ExtractionError: a prompt tokenises to nothing, or is too long and ``truncate`` is off.
    """
    if chat_template:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
        # The template already holds the special tokens (BOS etc.); adding them again would double them.
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        encoded = tokenizer(list(prompts))["input_ids"]
    out, too_long = [], []
    for i, ids in enumerate(encoded):
        ids = list(ids)
        if not ids:
            raise ExtractionError(f"{what} #{i} ({prompts[i]!r}) tokenises to no tokens")
        if max_length is not None and len(ids) > max_length:
            too_long.append((i, len(ids)))
            ids = ids[-max_length:]
        out.append(ids)
    if too_long:
        i, n = max(too_long, key=lambda t: t[1])
        message = (f"{len(too_long)} {what}(s) exceed max_length={max_length} tokens (longest: #{i}, {n} tokens: "
                   f"{prompts[i][:60]!r}…)")
        if not truncate:
            raise ExtractionError(
                f"{message}; shorten them, or pass truncate=True (CLI: --truncate) to keep each prompt's last "
                f"{max_length} tokens"
            )
        warnings.warn(f"{message}; kept the last {max_length} tokens of each", stacklevel=3)
    return out


def text_tokenizer(processing_class: Any) -> Any:
    """The text tokenizer of a Trainer's ``processing_class``: a multimodal processor carries it as ``.tokenizer``;
    a tokenizer (or ``None``) is returned as it is."""
    if processing_class is not None and not hasattr(processing_class, "apply_chat_template") \
            and hasattr(processing_class, "tokenizer"):
        return processing_class.tokenizer
    return processing_class


def pad_token_id(tokenizer: Any) -> int:
    # Fallback for tokenizers without a pad token: batches are padded on the right and every padded position is
    # masked out of pooling and comes after all real tokens, so (causal attention) the pad id never changes a
    # result. Use the pad token, else EOS, else id 0 — and never modify the caller's tokenizer.
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0

