r"""First-token constrained fine-tuning (Qi et al. 2024, "Safety alignment should be made more than just a few tokens
deep", arXiv 2406.05946): a token-weighted KL to the base model on the first reply tokens.

Alignment — and its erosion — acts mostly on the first few tokens of a reply, so this baseline keeps the fine-tuned
policy's distribution at those positions close to the base model's, most strongly at the very first token:

.. math:: \mathrm{FTKL} = \frac{1}{S} \sum_{b} \sum_{j=1}^{n} w_j\, \mathrm{KL}\big(\pi_\theta(\cdot|x_b, y_{b,<j})
          \,\|\, \pi_{ref}(\cdot|x_b, y_{b,<j})\big)

for every sequence b of the micro-batch whose reply (its labelled tokens, ``labels != -100``) starts at position
p_b: the j-th reply token y_{b,j} sits at p_b + j − 1 and is predicted by the logits at p_b + j − 2, so those are the
positions that count (j ≤ n and only while the reply lasts); S is the number of sequences with at least one such
position. Default weights: :math:`w_j = \beta^{(n-j)/(n-1)}` with β = ``first_token_weight`` = 5 and n = 5, i.e.
5, 3.34, 2.24, 1.50, 1 — the first token five times the fifth (the public code's ``first_token_bias_factor 5``,
``bias_length 5``). Reply tokens after the n-th get no constraint. The reverse KL, float32, on the final logits,
like ``KLToBaseCallback`` (whose gradient-hook machinery this reuses).

It is *added* to the trainer's own loss (the task's cross-entropy on every reply token), weighted by λ and divided by
the micro-batches per optimizer step; Qi et al.'s objective instead replaces the cross-entropy by a β-weighted
sigmoid of the per-token log-ratio. The additive KL form keeps the harness identical across baselines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .common import EngineCallback
from .kl import KLToBaseRegularizer

__all__ = ["FirstTokenKLCallback", "FirstTokenKLRegularizer", "first_token_weights"]


def first_token_weights(num_tokens: int = 5, first_token_weight: float = 5.0) -> list[float]:
    """w_j = β^{(n−j)/(n−1)}, j = 1..n: β at the first reply token down to 1 at the n-th (1 for n = 1: β)."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"`num_tokens` must be an int >= 1; got {num_tokens!r}")
    if not (isinstance(first_token_weight, (int, float)) and math.isfinite(first_token_weight)
            and first_token_weight > 0):
        raise ValueError(f"`first_token_weight` must be a finite number > 0; got {first_token_weight!r}")
    if num_tokens == 1:
        return [float(first_token_weight)]
    return [float(first_token_weight) ** ((num_tokens - j) / (num_tokens - 1)) for j in range(1, num_tokens + 1)]


def first_reply_positions(labels: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, T) of the logit positions predicting the first ``num_tokens`` reply tokens, the index j − 1 of the
    reply token each one predicts, (B, T) long) from the labels (reply = ``labels != -100``)."""
    labelled = labels != -100
    labelled[:, 0] = False  # the first token is never predicted
    B, T = labels.shape
    has_reply = labelled.any(dim=1)
    start = torch.where(has_reply, labelled.float().argmax(dim=1), torch.full_like(has_reply, T, dtype=torch.long))
    offset = torch.arange(T, device=labels.device).unsqueeze(0) - (start.unsqueeze(1) - 1)  # j − 1 at logit t
    predicts = torch.zeros_like(labelled)
    predicts[:, :-1] = labelled[:, 1:]  # logits at t predict token t + 1
    mask = predicts & (offset >= 0) & (offset < num_tokens)
    return mask, offset.clamp(min=0)


class FirstTokenKLRegularizer(KLToBaseRegularizer):
    r"""λ·FTKL (module docstring) entering through a gradient hook on the LM's logits; see ``KLToBaseRegularizer``
    for the hook, the reference (the PEFT model with its adapter disabled, or a frozen ``reference_model`` copy)
    and ``grad_scale``.

    Args:
        weight (`float`): λ.
        num_tokens (`int`, *optional*, defaults to `5`): n, the reply tokens constrained.
        first_token_weight (`float`, *optional*, defaults to `5.0`): β of the default weights.
        token_weights (`Sequence[float]`, *optional*): w_1 … w_n explicitly (overrides the two above).
        reference_model (`nn.Module`, *optional*): a frozen copy of the base model (full fine-tuning).
    """

    def __init__(self, weight: float, num_tokens: int = 5, first_token_weight: float = 5.0,
                 token_weights: Sequence[float] | None = None, reference_model: nn.Module | None = None):
        super().__init__(weight, reference_model=reference_model, mask="labels")
        if token_weights is None:
            token_weights = first_token_weights(num_tokens, first_token_weight)
        token_weights = [float(w) for w in token_weights]
        if not token_weights or any(not math.isfinite(w) or w < 0 for w in token_weights):
            raise ValueError(f"`token_weights` must be finite numbers >= 0, at least one; got {token_weights!r}")
        self.token_weights = token_weights

    def _positions(self, inputs: dict[str, Any], logits: torch.Tensor):
        labels = inputs.get("labels")
        if not isinstance(labels, torch.Tensor):
            raise ValueError(
                "FirstTokenKLCallback finds the reply from the labels (`labels != -100`), but this forward carries no "
                "`labels` (DPOTrainer, `compute_loss_func` and label smoothing do not pass them to the model)"
            )
        labels = labels.to(logits.device)
        mask, offset = first_reply_positions(labels, len(self.token_weights))
        attention = self._position_mask(inputs, logits)  # padding excluded, `logits_to_keep` handled
        if mask.shape[1] != attention.shape[1]:
            mask, offset = mask[:, -attention.shape[1]:], offset[:, -attention.shape[1]:]
        mask = mask & attention
        table = torch.tensor(self.token_weights, device=logits.device)
        weights = table[offset[mask]]
        sequences = int(mask.any(dim=1).sum())
        return mask, weights, max(sequences, 1)


class FirstTokenKLCallback(EngineCallback):
    r"""First-token constrained fine-tuning (Qi et al. 2024) as a Trainer callback: adds λ·FTKL (see
    ``orthoreg.baselines.first_token``) to every training micro-batch, divided by ``gradient_accumulation_steps``.
    Needs ``labels`` in the forward (Trainer, SFTTrainer). Logged: ``first_token_kl/kl`` (FTKL, unweighted) and
    ``first_token_kl/total`` (λ·FTKL). Costs one extra no-grad forward per micro-batch.

    Args:
        weight (`float`): λ.
        num_tokens (`int`, *optional*, defaults to `5`), first_token_weight (`float`, *optional*, defaults to `5.0`),
        token_weights (`Sequence[float]`, *optional*), reference_model (`nn.Module`, *optional*): as in
            ``FirstTokenKLRegularizer``.

    Example:
        >>> from orthoreg.baselines import FirstTokenKLCallback
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[FirstTokenKLCallback(1.0)])
    """

    metric_prefix = "first_token_kl/"

    def __init__(self, weight: float, num_tokens: int = 5, first_token_weight: float = 5.0,
                 token_weights: Sequence[float] | None = None, reference_model: nn.Module | None = None):
        super().__init__(FirstTokenKLRegularizer(weight, num_tokens, first_token_weight, token_weights,
                                                 reference_model))

    @property
    def regularizer(self) -> FirstTokenKLRegularizer:
        return self.engine
