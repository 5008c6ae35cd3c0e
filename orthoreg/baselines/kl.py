r"""KL to the base model: :math:`\lambda\,\mathrm{mean}_t\,\mathrm{KL}(\pi_\theta\|\pi_{ref})`, entering through a
gradient hook on the LM's output logits."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.capture import token_mask, unwrap_model
from ..engine.regularizer import (
    NonFiniteHiddenStateError,
    batch_shape,
    find_peft_model,
    reference_forward,
    reference_forward_active,
)
from ..terms.penalties import select_tokens
from .common import (
    NOT_FOR_REFERENCE,
    EngineCallback,
    MaskPolicy,
    call_kwargs,
    check_mask,
    check_weight,
    no_reference_error,
    prepare_reference_model,
)

__all__ = ["AddLogitGradient", "KLToBaseCallback", "KLToBaseRegularizer", "kl_and_gradient", "kl_to_reference"]


def kl_to_reference(
    logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Mean per-token KL divergence :math:`\mathrm{KL}(\pi_\theta \| \pi_{ref})` from next-token logits.

    With :math:`z_t` the logits at position t (``logits``) and :math:`z^{ref}_t` the reference's (``reference_logits``),
    :math:`\log\pi = \mathrm{log\_softmax}(z)` in float32, and t ranging over the N positions selected by ``mask``:

    .. math:: \mathrm{KL} = \frac{1}{N} \sum_t \sum_v \pi_\theta(v|x_{\le t})
              \big(\log \pi_\theta(v|x_{\le t}) - \log \pi_{ref}(v|x_{\le t})\big)

    Differentiable in ``logits``; ``reference_logits`` is a constant. Exactly 0 when no position is selected.

    Args:
        logits (`torch.Tensor`): (B, T, V) or (N, V).
        reference_logits (`torch.Tensor`): same shape as ``logits``.
        mask (`torch.Tensor`, *optional*): boolean (B, T) selection of positions.
    """
    if tuple(reference_logits.shape) != tuple(logits.shape):
        raise ValueError(
            f"reference logits have shape {tuple(reference_logits.shape)} but the logits are {tuple(logits.shape)}; "
            "the reference model must share the vocabulary and see the same inputs"
        )
    z = select_tokens(logits, mask)
    if z.shape[0] == 0:
        return z.sum()
    log_p = torch.log_softmax(z, dim=-1)
    log_q = torch.log_softmax(select_tokens(reference_logits.detach(), mask), dim=-1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum() / z.shape[0]


def kl_and_gradient(logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor,
                    weights: torch.Tensor | None = None, normaliser: float | None = None):
    r"""KL value (float32) and its exact gradient w.r.t. the selected rows of ``logits`` (float32, (N, V)).

    For one position, with d = log π − log π_ref and KL_t = Σ_v π_v d_v: ∂KL_t/∂z_v = π_v (d_v − KL_t); the mean
    over N positions divides by N. With ``weights`` (N,) (one per selected position, in ``mask``'s row-major order)
    the value is Σ_t w_t KL_t / ``normaliser`` and each row's gradient is scaled by w_t / ``normaliser``. In-place
    arithmetic keeps the peak at about three (N, V) float32 buffers.
    """
    with torch.no_grad():
        z = logits.detach()[mask].float()  # (N, V)
        n = z.shape[0]
        if n == 0:
            return z.new_zeros(()), None
        p = torch.log_softmax(z, dim=-1)
        del z
        d = p - torch.log_softmax(reference_logits[mask].float(), dim=-1)
        p.exp_()  # log π → π
        d.masked_fill_(p == 0, 0.0)  # 0·log 0 = 0 where π_θ has no mass
        kl_tok = (p * d).sum(dim=-1, keepdim=True)  # (N, 1)
        if weights is None:
            grad = d.sub_(kl_tok).mul_(p).div_(n)
            return kl_tok.sum() / n, grad
        w = weights.to(device=kl_tok.device, dtype=torch.float32).reshape(-1, 1) / float(normaliser)
        grad = d.sub_(kl_tok).mul_(p).mul_(w)
        return (kl_tok * w).sum(), grad


class AddLogitGradient:
    """One-shot tensor hook: adds ``extra`` to the rows of ``∂L/∂logits`` selected by ``index``."""

    def __init__(self, index: tuple[torch.Tensor, torch.Tensor], extra: torch.Tensor):
        self.index, self.extra = index, extra

    def __call__(self, grad_logits: torch.Tensor) -> torch.Tensor:
        extra, self.extra = self.extra, None  # frees the (N, V) buffer as soon as it has been used
        if extra is None:  # a second backward through the same graph (retain_graph): the term is added once
            return grad_logits
        return grad_logits.index_put(self.index, extra.to(grad_logits.dtype), accumulate=True)


class KLToBaseRegularizer:
    r"""Adds :math:`\lambda\,\mathrm{KL}(\pi_\theta\|\pi_{ref})` (see ``kl_to_reference``) to a causal LM's gradients.

    **Where the gradient enters.** A forward hook on the unwrapped LM (``LlamaForCausalLM``, …) runs after the LM
    has produced its final ``output.logits`` (after any logit soft-capping or scaling the family applies) and, for
    a training forward (``lm.training`` and grad enabled), runs the reference forward on the same inputs under
    ``torch.no_grad()``, computes the KL and its exact gradient
    :math:`\partial\mathrm{KL}/\partial z_{t,v} = \pi_v(d_v - \mathrm{KL}_t)/N`, and registers a one-shot gradient
    hook on ``output.logits`` that adds ``coef ·`` that gradient (``coef = weight · grad_scale``). Every loss a
    trainer builds from this forward reaches the parameters through ``output.logits`` — ``Trainer``/``SFTTrainer``
    through ``output.loss``, which the LM computed *from* that tensor, ``DPOTrainer`` and ``compute_loss_func``
    through the logits themselves — so the parameters receive exactly
    :math:`\nabla(\mathcal{L}_{task} + \mathrm{coef}\cdot\mathrm{KL})`, whatever the trainer. (Wrapping
    ``output.logits`` in an identity ``autograd.Function`` would *not* work: the Trainer's ``output.loss`` was
    computed from the unwrapped tensor, so the wrapper would never see a gradient. Injecting at the decoder-stack
    output would need the LM head applied a second time and each family's logit post-processing.)

    Args:
        weight (`float`): λ.
        reference_model (`nn.Module`, *optional*): a frozen copy of the base model (full fine-tuning). Put in eval
            mode with ``requires_grad_(False)`` and moved to the model's device on ``attach``. Default: the same
            PEFT model with its adapter disabled (in the model's current train/eval mode, like orthoreg's paired
            anchor).
        mask (`str`, *optional*, defaults to `"attention"`): positions t that count: ``"attention"`` (non-padding
            positions) or ``"labels"`` (positions whose next token carries a label, i.e. the positions the task's
            cross-entropy scores: ``labels[:, t + 1] != -100``).

    Attributes:
        grad_scale (`float`): multiplier per micro-batch (the callback sets 1/GA).
    """

    def __init__(self, weight: float, reference_model: nn.Module | None = None, mask: MaskPolicy = "attention"):
        self.weight = check_weight("weight", weight)
        self.reference_model = reference_model
        self.mask = check_mask(mask)
        self.grad_scale = 1.0
        self.lm: nn.Module | None = None
        self._peft_model: nn.Module | None = None
        self._handles: list[Any] = []
        self._reset_metrics()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, model: nn.Module) -> KLToBaseRegularizer:
        """Installs the hook on ``model`` (bare, PEFT- or DDP/DeepSpeed/FSDP-wrapped).

        Raises:
            ValueError: no reference is available, or ``reference_model`` is not an independent copy or has another
                vocabulary.
        """
        if self._handles:
            raise RuntimeError("this KLToBaseRegularizer is already attached; call detach() first")
        lm = unwrap_model(model)
        peft_model = find_peft_model(model)
        if self.reference_model is None and peft_model is None:
            raise no_reference_error("KLToBaseCallback")
        if self.reference_model is not None:
            prepare_reference_model(self.reference_model, model, "KLToBaseCallback")
            ours, theirs = _vocab_size(lm), _vocab_size(unwrap_model(self.reference_model))
            if ours is not None and theirs is not None and ours != theirs:
                raise ValueError(
                    f"KLToBaseCallback: the reference model has a vocabulary of {theirs} tokens but the model has "
                    f"{ours}; the reference must be a copy of the base model"
                )
        self.lm, self._peft_model = lm, peft_model
        self._handles.append(lm.register_forward_hook(self._after_forward, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ hooks
    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if reference_forward_active() or not (module.training and torch.is_grad_enabled()):
            return None
        logits = getattr(output, "logits", None)
        if logits is None:
            raise RuntimeError(
                "KLToBaseCallback found no `logits` in the model's output: the model returned a tuple "
                "(`return_dict=False`) or skipped the LM head (Liger fused cross-entropy, `use_liger_kernel=True`). "
                "Run with return_dict=True and without Liger's fused loss."
            )
        if not logits.requires_grad:
            return None
        inputs = call_kwargs(module, args, kwargs)
        mask, weights, normaliser = self._positions(inputs, logits)
        reference_logits = self._reference_logits(module, inputs)
        if tuple(reference_logits.shape) != tuple(logits.shape):
            raise ValueError(
                f"KLToBaseCallback: reference logits have shape {tuple(reference_logits.shape)} but the model's are "
                f"{tuple(logits.shape)}; the reference must be a copy of the base model"
            )
        kl, grad = kl_and_gradient(logits, reference_logits, mask, weights, normaliser)
        if not torch.isfinite(kl):
            raise NonFiniteHiddenStateError(
                "KL(π_θ ‖ π_ref) is not finite: the logits contain NaN/Inf or the reference gives zero probability "
                "to tokens the model predicts. Lower the learning rate, or use bf16/fp32."
            )
        coef = self.weight * self.grad_scale
        self._metric_sums["kl"] = self._metric_sums.get("kl", 0) + kl
        self._metric_sums["total"] = self._metric_sums.get("total", 0) + self.weight * kl
        self._metric_count += 1
        if grad is not None:
            # Stored pre-scaled in the logits' dtype (half the memory under bf16; the incoming gradient has that
            # dtype anyway).
            extra = grad.mul_(coef).to(logits.dtype)
            logits.register_hook(AddLogitGradient(mask.nonzero(as_tuple=True), extra))
        return None

    def _positions(self, inputs: dict[str, Any], logits: torch.Tensor):
        """(mask of the positions that count, their weights or None, the normaliser or None); subclasses (the
        first-token KL) weight positions."""
        return self._position_mask(inputs, logits), None, None

    def _position_mask(self, inputs: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
        shape = batch_shape(inputs)
        B, L = logits.shape[0], logits.shape[1]
        if shape is None:
            shape = (B, L)
        mask = token_mask(inputs, shape, "attention").to(logits.device)
        if self.mask == "labels":
            labels = inputs.get("labels")
            if not isinstance(labels, torch.Tensor):
                raise ValueError(
                    "KLToBaseCallback(mask='labels') but this forward call carries no `labels` (DPOTrainer, "
                    "`compute_loss_func` and label smoothing do not pass them to the model). Use mask='attention'."
                )
            scored = torch.zeros_like(mask)
            scored[:, :-1] = labels[:, 1:].to(mask.device) != -100  # logits at t predict token t + 1
            mask = mask & scored
        if mask.shape[1] != L:  # `logits_to_keep`: the logits cover the last L positions
            mask = mask[:, -L:]
        return mask

    @torch.no_grad()
    def _reference_logits(self, lm: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        kwargs = {k: v for k, v in inputs.items() if k not in NOT_FOR_REFERENCE}
        kwargs["use_cache"] = False
        with reference_forward():
            if self.reference_model is not None:
                output = self.reference_model(**kwargs)
            else:
                with self._peft_model.disable_adapter():
                    output = lm(**kwargs)
        logits = getattr(output, "logits", None)
        if logits is None:
            raise RuntimeError("KLToBaseCallback: the reference model returned no `logits`")
        return logits

    # ------------------------------------------------------------------ metrics
    def _reset_metrics(self) -> None:
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_count = 0

    def pop_metrics(self) -> dict[str, float]:
        """``kl`` (unweighted) and ``total`` (λ·KL), means over the micro-batches since the last call."""
        out = {name: float(value) / self._metric_count for name, value in self._metric_sums.items()}
        self._reset_metrics()
        return out


def _vocab_size(lm: nn.Module) -> int | None:
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] > 0:
        return int(weight.shape[0])
    config = getattr(lm, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "vocab_size", None)


class KLToBaseCallback(EngineCallback):
    r"""KL-to-reference regularisation (the "KL" defence of Kaczér et al.) as a Trainer callback.

    Adds :math:`\lambda \cdot \mathrm{KL}(\pi_\theta \| \pi_{ref})` to every training micro-batch, per token:

    .. math:: \mathrm{KL} = \frac{1}{N} \sum_{t} \sum_{v} \pi_\theta(v|x_{\le t})
              \big(\log\pi_\theta(v|x_{\le t}) - \log\pi_{ref}(v|x_{\le t})\big)

    the *reverse* KL (the fine-tuned policy's expectation, as in RLHF's KL penalty), t ranging over the N non-padding
    positions of the micro-batch (``mask="labels"``: only the positions whose next token is a training target), in
    float32 on the model's final logits. π_ref is the same PEFT model with its adapter disabled (no extra weights),
    or a frozen ``reference_model`` copy for full fine-tuning. Costs one extra no-grad forward per micro-batch.

    The term enters through a gradient hook on the LM's output logits (see ``KLToBaseRegularizer``), so it works
    unchanged in ``Trainer``, ``SFTTrainer`` and ``DPOTrainer`` (whose reference passes run without grad and are not
    regularised), with activation checkpointing, PEFT and DDP. Each micro-batch's term is divided by
    ``gradient_accumulation_steps``. Logged: ``kl_to_base/kl`` (unweighted) and ``kl_to_base/total`` (λ·KL), means
    over the micro-batches since the last log, averaged over ranks.

    Args:
        weight (`float`): λ.
        reference_model (`nn.Module`, *optional*): frozen copy of the base model for full fine-tuning (set to eval
            mode, ``requires_grad_(False)``, moved to the model's device when training starts). Under ZeRO-3/FSDP
            prefer PEFT: the copy is not sharded.
        mask (`str`, *optional*, defaults to `"attention"`): ``"attention"`` or ``"labels"``.

    Example:
        >>> from orthoreg.baselines import KLToBaseCallback
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[KLToBaseCallback(0.1)])
        >>> # full fine-tuning: a frozen copy of the base model is the reference
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
        ...                   callbacks=[KLToBaseCallback(0.1, reference_model=copy.deepcopy(model))])
    """

    metric_prefix = "kl_to_base/"

    def __init__(self, weight: float, reference_model: nn.Module | None = None, mask: MaskPolicy = "attention"):
        super().__init__(KLToBaseRegularizer(weight, reference_model=reference_model, mask=mask))

    @property
    def regularizer(self) -> KLToBaseRegularizer:
        return self.engine

