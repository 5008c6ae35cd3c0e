r"""``AnchorKLCallback``: the anchor KL (``orthoreg.anchor``) on its own, as a ``transformers`` TrainerCallback.

``OrthoRegConfig.recommended()`` already runs the anchor KL inside ``OrthoRegCallback`` (on the built-in harmless
requests); this callback is the same term beside any other callback — the defence benchmark's anchor arms, whose
default anchors are the built-in **harmful** requests, and anchors of one's own. The term, its formula and its
data-parallel behaviour: ``orthoreg.anchor.term``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from ..anchor import AnchorKL, AnchorKLError, anchor_prompts, check_anchor_backend, data_parallel_rank
from ..core.trainer_callbacks import move_ahead_of_reporters, report_metrics

__all__ = ["AnchorKLCallback"]


class AnchorKLCallback(TrainerCallback):
    r"""λ·AKL (``orthoreg.anchor.term``) added to every optimizer step's gradient.

    Logged: ``anchor_kl/kl`` (AKL, unweighted, mean over the steps since the last log and over ranks) and
    ``anchor_kl/total`` (λ·AKL).

    Args:
        weight (`float`): λ (> 0).
        prompts (`Sequence[str]` or `str`, *optional*): the anchor requests, ``"harmful"`` / ``"harmless"`` for
            orthoreg's built-in ones, or a ``.json`` file of requests; defaults to ``"harmful"``.
        tokenizer (*optional*): the tokenizer whose chat template renders the training data; defaults to the
            Trainer's ``processing_class``.
        num_tokens (`int`, *optional*, defaults to `4`): n, the base's reply tokens held per anchor.
        batch_size (`int`, *optional*, defaults to `8`): anchors per optimizer step (and rank).
        seed (`int`, *optional*): the anchors' cycle order; defaults to ``TrainingArguments.seed``.
    """

    metric_prefix = "anchor_kl/"

    def __init__(self, weight: float, prompts: Sequence[str] | str | None = None, tokenizer: Any = None,
                 num_tokens: int = 4, batch_size: int = 8, seed: int | None = None):
        self.term = AnchorKL(weight, anchor_prompts("harmful" if prompts is None else prompts), num_tokens,
                             batch_size)
        self.tokenizer, self.seed = tokenizer, seed

    @property
    def prompts(self) -> list[str]:
        return self.term.prompts

    def on_init_end(self, args, state, control, **kwargs):
        move_ahead_of_reporters(self)

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if model is None:
            raise AnchorKLError("AnchorKLCallback received no model in on_train_begin")
        check_anchor_backend(args, model, "AnchorKLCallback")
        move_ahead_of_reporters(self)
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        if tokenizer is None:
            raise AnchorKLError("AnchorKLCallback needs the tokenizer: pass tokenizer= or the Trainer's "
                                "processing_class")
        if not self.term.recorded:
            self.term.record_base(model, tokenizer, args.seed if self.seed is None else self.seed)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.term.backward(model, state.global_step, *data_parallel_rank())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        metrics = self.term.pop_metrics()
        if metrics:
            metrics = {"kl": metrics["anchor_kl"], "total": self.term.weight * metrics["anchor_kl"]}
        report_metrics(metrics, self.metric_prefix, logs, state)
