r"""The anchor KL's formula: the model's next-token distribution against recorded base log-probabilities.

.. math:: \mathrm{KL} = \frac{1}{N} \sum_{n=1}^{N} \sum_v \pi_\theta(v \mid n)
          \big(\log \pi_\theta(v \mid n) - \log \pi_{base}(v \mid n)\big)

over N positions (rows), with :math:`\log\pi_\theta = \mathrm{log\_softmax}(z)` of the model's logits z in float32
whatever their dtype, :math:`\log\pi_{base}` recorded once (a constant), and :math:`0 \cdot \log 0 = 0`. It is the
reverse KL — the model's expectation — as in RLHF's KL penalty: the model is pulled back wherever it puts mass the
base did not.
"""

from __future__ import annotations

import torch

__all__ = ["reply_kl"]


def reply_kl(logits: torch.Tensor, base_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over the N rows of KL(π_θ ‖ π_base) (module docstring), float32, differentiable in ``logits``.

    Args:
        logits (`torch.Tensor`): (N, V) logits of the model being trained.
        base_log_probs (`torch.Tensor`): (N, V) the base's log-probabilities at the same positions.

    Raises:
        ValueError: the shapes differ (the model must share the base's vocabulary), or N = 0.
    """
    if logits.shape != base_log_probs.shape or logits.dim() != 2:
        raise ValueError(f"logits {tuple(logits.shape)} and base log-probs {tuple(base_log_probs.shape)} must be the "
                         "same (N, V) shape: the model must share the base's vocabulary")
    if logits.shape[0] == 0:
        raise ValueError("reply_kl got no positions: every anchor holds at least one reply token")
    log_p = torch.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    gap = log_p - base_log_probs.detach().float()
    return torch.where(p > 0, p * gap, torch.zeros_like(p)).sum() / logits.shape[0]
