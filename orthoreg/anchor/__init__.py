"""The anchor KL: the base's first reply tokens held on anchor requests the fine-tune never trains on
(``term``), and which requests (``prompts``)."""

from .prompts import BUILTIN_ANCHORS, AnchorKLError, anchor_prompts, builtin_anchors, check_prompts
from .term import (
    AnchorKL,
    anchor_kl_for,
    check_anchor_backend,
    checkpointing_off,
    data_parallel_rank,
    greedy_replies,
    sharded_backend,
)

__all__ = ["BUILTIN_ANCHORS", "AnchorKL", "AnchorKLError", "anchor_kl_for", "anchor_prompts", "builtin_anchors",
           "check_anchor_backend", "check_prompts", "checkpointing_off", "data_parallel_rank", "greedy_replies",
           "sharded_backend"]
