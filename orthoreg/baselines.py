r"""The known defences against safety drift, as plain ``transformers.TrainerCallback``\ s in orthoreg's harness.

So that the benchmarks compare them with orthoreg side by side — same Trainer, same data, same logging — every
baseline here is a callback that plugs into ``Trainer``, TRL's ``SFTTrainer``/``DPOTrainer`` or the testbed's
``finetune(callbacks=...)`` unchanged, and reuses orthoreg's hook machinery (``orthoreg.capture``,
``orthoreg.regularizer``):

- ``KLToBaseCallback``: :math:`\lambda\,\mathrm{mean}_t\,\mathrm{KL}(\pi_\theta\|\pi_{ref})`, entering through a
  gradient hook on the LM's output logits;
- ``LDIFSCallback``: :math:`\lambda \sum_\ell \mathrm{mean}_t \|h_\ell - h_\ell^{ref}\|^2`, injected at the
  decoder-stack output by ``OrthoRegularizer``'s engine;
- ``CAFTCallback``: :math:`h_\ell \leftarrow h_\ell - (h_\ell U_\ell^\top) U_\ell` at the guarded layers' outputs, in
  training forwards only;
- ``interleave``: aligned examples mixed into the task data;
- ``EarlyStoppingOnMetric``: stop once a logged/evaluated metric crosses a threshold.

The reference policy / features (:math:`\pi_{ref}`, :math:`h^{ref}`) come from the *same* PEFT model with its
adapter disabled (no extra weights), or from a frozen ``reference_model`` copy for full fine-tuning.

Like orthoreg's own penalties, each micro-batch's term is divided by the micro-batches of its optimizer step
(``gradient_accumulation_steps``, fewer in an epoch's uneven last step; scaled like the task loss), so the weight
per optimizer step does not depend on the number of micro-batches. The gradients skip fp16 loss scaling, so fp16
with a GradScaler is refused (use bf16 or fp32).

**Early stopping.** The benchmarks evaluate the early-stopping defence from the plain run's own trajectory (its
checkpoints / evaluations at several steps, at matched narrow-task accuracy): that costs no extra training and
gives every stopping point at once. For a single run that should stop by itself (recipes), use
``EarlyStoppingOnMetric``.

**Composition.** The benchmarks run one defence per arm. ``KLToBaseCallback`` composes with ``OrthoRegCallback`` (its
reference forward runs after orthoreg's session has closed; tested). ``LDIFSCallback`` runs on ``OrthoRegularizer``'s
engine and, like two ``OrthoRegCallback``\ s with ``anchor="paired"``, must not share a model with another regulariser
whose reference forward runs the same decoder stack (each would capture the other's reference activations). A
layer guarded by both ``CAFTCallback`` and orthoreg sees the ablated or the raw output depending on hook order:
guard different layers.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .callback import _length, _move_ahead_of_reporters, accumulation_scale, report_metrics
from .capture import (
    bind_forward_inputs,
    find_decoder_stack,
    layer_hidden,
    resolve_layers,
    token_mask,
    unwrap_model,
)
from .config import OrthoRegConfig
from .directions import DirectionsError, HarmfulDirections, orthonormalize
from .penalties import select_tokens
from .regularizer import (
    NO_GRAD_CHECKPOINT_WARNING,
    NonFiniteHiddenStateError,
    OrthoRegularizer,
    _batch_shape,
    _find_peft_model,
    capture_reference_layers,
    reference_forward,
    reference_forward_active,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CAFTCallback",
    "ConceptAblation",
    "EarlyStoppingOnMetric",
    "KLToBaseCallback",
    "KLToBaseRegularizer",
    "LDIFSCallback",
    "LDIFSRegularizer",
    "feature_distance",
    "interleave",
    "kl_to_reference",
]

MaskPolicy = Literal["attention", "labels"]
_MASK_POLICIES = ("attention", "labels")
# Forward kwargs that must not reach the reference forward: it computes no loss and keeps no cache.
_NOT_FOR_REFERENCE = ("labels", "num_items_in_batch", "past_key_values", "use_cache", "return_dict")
# transformers < 5.23 checkpoints layers in training mode even under no_grad; torch then warns on every reference pass.
def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`{name}` must be a finite number > 0; got {value!r}. For the unregularised arm, train without the "
            "callback."
        )
    return float(value)


def _check_mask(mask: Any) -> str:
    if mask not in _MASK_POLICIES:
        raise ValueError(f"`mask` must be one of {_MASK_POLICIES}; got {mask!r}")
    return mask


def _call_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The keyword arguments of a forward call, with positional arguments named and ``**kwargs`` flattened."""
    inputs = dict(bind_forward_inputs(module, args, kwargs))
    if args:
        for name, param in inspect.signature(module.forward).parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and isinstance(inputs.get(name), dict):
                inputs.update(inputs.pop(name))
    return inputs


def _prepare_reference_model(reference_model: nn.Module, model: nn.Module, what: str) -> nn.Module:
    """Freezes ``reference_model`` (eval mode, no grad) and moves it to ``model``'s device."""
    if not isinstance(reference_model, nn.Module):
        raise TypeError(f"`reference_model` must be an nn.Module; got {type(reference_model).__name__}")
    if reference_model is model or unwrap_model(reference_model) is unwrap_model(model):
        raise ValueError(
            f"{what}: `reference_model` is the model being trained; pass a frozen copy made before training, "
            "e.g. `reference_model=copy.deepcopy(model)`"
        )
    trained = {id(p) for p in model.parameters()}
    if any(id(p) in trained for p in reference_model.parameters()):
        raise ValueError(
            f"{what}: `reference_model` shares parameters with the model being trained, so it would move with "
            "training; pass an independent copy (`copy.deepcopy(model)` before training)"
        )
    reference_model.requires_grad_(False)
    reference_model.eval()
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "meta":
        ref_param = next(reference_model.parameters(), None)
        if ref_param is not None and ref_param.device != param.device:
            reference_model.to(param.device)
    return reference_model


def _no_reference_error(what: str) -> ValueError:
    return ValueError(
        f"{what} needs a reference model and found none: train a PEFT model (the same model with its adapter "
        "disabled is the reference, no extra weights), or, for full fine-tuning, pass a frozen copy made before "
        "training: `reference_model=copy.deepcopy(model)`"
    )


# ====================================================================================== KL to the base model
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


def _kl_and_gradient(logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor):
    r"""KL value (float32) and its exact gradient w.r.t. the selected rows of ``logits`` (float32, (N, V)).

    For one position, with d = log π − log π_ref and KL_t = Σ_v π_v d_v: ∂KL_t/∂z_v = π_v (d_v − KL_t); the mean
    over N positions divides by N. In-place arithmetic keeps the peak at about three (N, V) float32 buffers.
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
        grad = d.sub_(kl_tok).mul_(p).div_(n)
        return kl_tok.sum() / n, grad


class _AddLogitGradient:
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
        self.weight = _check_weight("weight", weight)
        self.reference_model = reference_model
        self.mask = _check_mask(mask)
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
        peft_model = _find_peft_model(model)
        if self.reference_model is None and peft_model is None:
            raise _no_reference_error("KLToBaseCallback")
        if self.reference_model is not None:
            _prepare_reference_model(self.reference_model, model, "KLToBaseCallback")
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
        inputs = _call_kwargs(module, args, kwargs)
        mask = self._position_mask(inputs, logits)
        reference_logits = self._reference_logits(module, inputs)
        if tuple(reference_logits.shape) != tuple(logits.shape):
            raise ValueError(
                f"KLToBaseCallback: reference logits have shape {tuple(reference_logits.shape)} but the model's are "
                f"{tuple(logits.shape)}; the reference must be a copy of the base model"
            )
        kl, grad = _kl_and_gradient(logits, reference_logits, mask)
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
            logits.register_hook(_AddLogitGradient(mask.nonzero(as_tuple=True), extra))
        return None

    def _position_mask(self, inputs: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
        shape = _batch_shape(inputs)
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
        kwargs = {k: v for k, v in inputs.items() if k not in _NOT_FOR_REFERENCE}
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


# ====================================================================================== LDIFS
def feature_distance(h: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""LDIFS' feature distance of one layer: :math:`\mathrm{mean}_x \|x - x_{ref}\|^2`.

    x ranges over the selected rows of ``h`` (float32), :math:`x_{ref}` over the same rows of ``reference`` (a
    constant). Exactly 0 when no row is selected.
    """
    if tuple(reference.shape) != tuple(h.shape):
        raise ValueError(f"reference hidden states have shape {tuple(reference.shape)}, not {tuple(h.shape)}")
    x = select_tokens(h, mask)
    if x.shape[0] == 0:
        return x.sum()
    return (x - select_tokens(reference.detach(), mask)).square().sum() / x.shape[0]


class LDIFSRegularizer(OrthoRegularizer):
    r"""LDIFS-style feature anchoring, on orthoreg's hook engine.

    .. math:: \lambda \sum_{\ell \in \text{layers}} \mathrm{mean}_t \, \| h_\ell(t) - h^{ref}_\ell(t) \|^2

    :math:`h_\ell` is the output of decoder layer ℓ (the residual stream after block ℓ) and :math:`h^{ref}_\ell` the
    same layer's output of the reference model on the same tokens; t ranges over the tokens selected by ``mask``.
    (Booster's ``LDIFSTrainer`` uses ρ/2 and drops layer terms above 0.1; here ρ/2 is folded into λ and nothing is
    dropped.)

    Everything but the penalty is ``OrthoRegularizer``'s: the session opened by the pre-hook on the LM (token mask,
    reference forward), capture of the first call per forward at each guarded layer (activation checkpointing
    safe), and injection of the penalty's gradient at the decoder-stack output with ``coef = λ · grad_scale``.

    Args:
        weight (`float`): λ.
        layers (`int | str | list`, *optional*, defaults to `"all"`): guarded layers (see ``resolve_layers``).
        reference_model (`nn.Module`, *optional*): a frozen copy of the base model (full fine-tuning); default: the
            same PEFT model with its adapter disabled (orthoreg's ``_reference_hidden_states``).
        mask (`str`, *optional*, defaults to `"attention"`): ``"attention"`` or ``"labels"`` tokens.
        per_layer_metrics (`bool`, *optional*, defaults to `False`): also report ``distance/layer_i``.
        layers_path (`str`, *optional*): dotted path of the decoder-layer list, for unrecognised architectures.
    """

    def __init__(self, weight: float, layers: Any = "all", reference_model: nn.Module | None = None,
                 mask: MaskPolicy = "attention", per_layer_metrics: bool = False, layers_path: str | None = None):
        weight = _check_weight("weight", weight)
        # The engine's config carries layers/mask/paths; its cov/proj weights are unused (``_penalty`` is replaced),
        # cov_weight only satisfies OrthoRegConfig's "some weight > 0" check.
        config = OrthoRegConfig(layers=layers, cov_weight=weight, proj_weight=0.0, anchor="absolute",
                                mask=_check_mask(mask), per_layer_metrics=per_layer_metrics, layers_path=layers_path)
        super().__init__(config, directions=None, mode="inject")
        self.weight = weight
        self.reference_model = reference_model
        self._ref_stack = None

    def attach(self, model: nn.Module) -> LDIFSRegularizer:
        """Installs the hooks; see ``OrthoRegularizer.attach``.

        Raises:
            ValueError: no reference is available, or ``reference_model`` has another shape or is not independent.
        """
        if self.reference_model is None and _find_peft_model(model) is None:
            raise _no_reference_error("LDIFSCallback")
        ref_stack = None
        if self.reference_model is not None:
            _prepare_reference_model(self.reference_model, model, "LDIFSCallback")
            stack = find_decoder_stack(model, layers_path=self.config.layers_path)
            ref_stack = find_decoder_stack(self.reference_model, layers_path=self.config.layers_path)
            if (ref_stack.hidden_size, ref_stack.num_layers) != (stack.hidden_size, stack.num_layers):
                raise ValueError(
                    f"LDIFSCallback: the reference model has {ref_stack.num_layers} layers of width "
                    f"{ref_stack.hidden_size} but the model has {stack.num_layers} of width {stack.hidden_size}; the "
                    "reference must be a copy of the base model"
                )
        super().attach(model)
        self._ref_stack = ref_stack
        return self

    def _open_session(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if reference_forward_active():
            return None
        super()._open_session(module, args, kwargs)  # mask and ``active``; no reference (proj_weight == 0)
        session = self._session
        if session is not None and session.active:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=NO_GRAD_CHECKPOINT_WARNING)
                if self._ref_stack is None:
                    session.reference = self._reference_hidden_states(module, args, kwargs)  # adapter disabled
                else:
                    session.reference = self._frozen_reference_hidden_states(module, args, kwargs)
        return None

    @torch.no_grad()
    def _frozen_reference_hidden_states(self, lm: nn.Module, args: tuple, kwargs: dict) -> dict[int, torch.Tensor]:
        """The guarded layers' outputs of ``reference_model`` on the same inputs (its layers above are skipped)."""
        return capture_reference_layers(self._ref_stack, self.layer_indices, _call_kwargs(lm, args, kwargs))

    def _penalty(self, session) -> torch.Tensor | None:
        mask = session.mask
        total = None
        values: dict[str, torch.Tensor] = {}
        for index in self.layer_indices:
            h = session.captured[index]
            if mask is not None and mask.device != h.device:
                mask = mask.to(h.device)
            reference = session.reference[index].to(h.device)
            distance = feature_distance(h, reference, mask)
            values[f"distance/layer_{index}"] = distance.detach()
            total = distance if total is None else total + distance
        if not torch.isfinite(total):
            bad = [name for name, v in values.items() if not torch.isfinite(v)]
            raise NonFiniteHiddenStateError(
                f"LDIFS feature distance is not finite ({', '.join(bad)}): the hidden states contain NaN/Inf "
                "(diverging training, fp16 overflow). Lower the learning rate, or use bf16/fp32."
            )
        weighted = self.weight * total
        self._accumulate_metrics(values, weighted.detach())
        return weighted


# ====================================================================================== CAFT
class ConceptAblation:
    r"""CAFT-style concept ablation: removes a subspace from the guarded layers' outputs during training.

    At each guarded layer ℓ with directions :math:`U_\ell` (k, d), orthonormal rows, the layer's output hidden state
    is replaced out of place by

    .. math:: h_\ell \leftarrow h_\ell - (h_\ell U_\ell^\top)\, U_\ell

    (computed in float32, cast back to h's dtype), so the layers above see no component along :math:`U_\ell`.

    **Training forwards only, and a pure hook.** The hook ablates exactly when the layer is in training mode
    (``module.training``) and does nothing in eval mode (``model.eval()``, ``trainer.evaluate()``, generation).
    The decision depends on nothing but the module's mode and the tensor, so it is the same when activation
    checkpointing re-runs the layer during backward: on transformers < 5.23, where layer hooks fire inside the
    checkpoint (twice per step, the first call under no_grad with reentrant checkpointing), forward and recompute
    ablate identically; on ≥ 5.23 the hook runs once, outside the checkpoint. Consequently every forward made in
    training mode is ablated, including no-grad ones such as DPO's reference pass through the adapter-disabled
    model — which keeps policy and reference comparable, as CAFT's hooks stay on for the whole training run.

    Args:
        directions (`HarmfulDirections`, `torch.Tensor` or `Mapping[int, torch.Tensor]`): the concept subspaces. A
            single (k, d) tensor (or (d,) vector) is used at every guarded layer; rows are orthonormalised by QR.
        layers (`int | str | list`, *optional*): guarded layers (see ``resolve_layers``). Default: the layers the
            directions cover (required for a bare tensor).
        layers_path (`str`, *optional*): dotted path of the decoder-layer list, for unrecognised architectures.
    """

    def __init__(self, directions: HarmfulDirections | torch.Tensor | Mapping[int, torch.Tensor],
                 layers: Any = None, layers_path: str | None = None):
        if isinstance(directions, HarmfulDirections):
            self._per_layer: dict[int, torch.Tensor] | None = dict(directions.directions)
            self._shared = None
        elif isinstance(directions, Mapping):
            self._per_layer = dict(HarmfulDirections(dict(directions)).directions)
            self._shared = None
        elif isinstance(directions, torch.Tensor):
            u = directions.unsqueeze(0) if directions.dim() == 1 else directions
            self._shared = orthonormalize(u, name="CAFT directions")
            self._per_layer = None
            if layers is None:
                raise ValueError(
                    "CAFTCallback got one direction tensor and no `layers`: say which decoder layers to ablate at, "
                    "e.g. layers=[6] or layers='middle_third'"
                )
        else:
            raise TypeError(
                f"`directions` must be HarmfulDirections, a (k, d) tensor or a {{layer: tensor}} mapping; got "
                f"{type(directions).__name__}"
            )
        self.layers_spec = layers
        self.layers_path = layers_path
        self.layer_indices: list[int] = []
        self._u: dict[int, torch.Tensor] = {}  # per guarded layer, on the hidden states' device (float32)
        self._handles: list[Any] = []
        self._pending: set[int] = set()
        self._mask: torch.Tensor | None = None
        self._reset_metrics()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, model: nn.Module) -> ConceptAblation:
        """Installs the ablation hooks on ``model``'s guarded decoder layers.

        Raises:
            DirectionsError: a guarded layer has no directions, or their width is not the model's hidden size.
        """
        if self._handles:
            raise RuntimeError("this ConceptAblation is already attached; call detach() first")
        stack = find_decoder_stack(model, layers_path=self.layers_path)
        spec = self.layers_spec if self.layers_spec is not None else sorted(self._per_layer)
        indices = resolve_layers(spec, stack.num_layers)
        u_by_layer: dict[int, torch.Tensor] = {}
        for index in indices:
            if self._per_layer is not None and index not in self._per_layer:
                raise DirectionsError(
                    f"CAFTCallback: layer {index} is guarded but the directions cover layers {sorted(self._per_layer)}; "
                    "pass layers=... among those, or directions for every guarded layer"
                )
            u = self._shared if self._per_layer is None else self._per_layer[index]
            if u.shape[1] != stack.hidden_size:
                raise DirectionsError(
                    f"CAFTCallback: directions for layer {index} are {u.shape[1]} wide but the model's hidden size is "
                    f"{stack.hidden_size}; extract or load directions for this model"
                )
            u_by_layer[index] = u.float()
        self.layer_indices, self._u = indices, u_by_layer
        self._handles.append(stack.lm.register_forward_pre_hook(self._open_metrics, with_kwargs=True))
        for index in indices:
            self._handles.append(stack.layers[index].register_forward_hook(self._make_hook(index)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()
        self._mask = None

    def _open_metrics(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Bookkeeping only: which layers still owe their metric this forward (first call, not the recompute).
        if module.training and torch.is_grad_enabled():
            inputs = bind_forward_inputs(module, args, kwargs)
            shape = _batch_shape(inputs)
            self._mask = token_mask(inputs, shape, "attention") if shape is not None else None
            self._pending = set(self.layer_indices)
        return None

    def _make_hook(self, index: int):
        def ablate(module: nn.Module, args: tuple, output: Any) -> Any:
            if not module.training:
                return None
            h = layer_hidden(output)
            u = self._u[index]
            if u.device != h.device:
                u = self._u[index] = u.to(h.device)
            coords = h.float() @ u.T  # (B, T, k)
            ablated = (h.float() - coords @ u).to(h.dtype)
            if index in self._pending:
                self._pending.discard(index)
                self._record(index, coords.detach(), h.shape)
            return _replace_layer_hidden(output, ablated)

        return ablate

    @torch.no_grad()
    def _record(self, index: int, coords: torch.Tensor, shape: torch.Size) -> None:
        mask = self._mask
        if mask is not None and tuple(mask.shape) == tuple(shape[:-1]):
            coords = coords[mask.to(coords.device)]
        else:
            coords = coords.reshape(-1, coords.shape[-1])
        removed = coords.square().sum() / max(coords.shape[0], 1)
        name = f"removed/layer_{index}"
        self._metric_sums[name] = self._metric_sums.get(name, 0) + removed
        self._metric_sums["removed"] = self._metric_sums.get("removed", 0) + removed
        if index == self.layer_indices[0]:
            self._metric_count += 1

    def _reset_metrics(self) -> None:
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_count = 0

    def pop_metrics(self, per_layer: bool = False) -> dict[str, float]:
        """``removed``: mean over tokens of ‖U h‖² taken out, summed over guarded layers (``removed/layer_i``
        per layer with ``per_layer``), averaged over the training forwards since the last call."""
        count = max(self._metric_count, 1)
        out = {n: float(v) / count for n, v in self._metric_sums.items() if per_layer or "/layer_" not in n}
        self._reset_metrics()
        return out


def _replace_layer_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list) and output and isinstance(output[0], torch.Tensor):
        return [hidden] + list(output[1:])
    raise TypeError(f"cannot replace the hidden state in a decoder layer output of type {type(output).__name__}")


# ====================================================================================== callbacks
class _EngineCallback(TrainerCallback):
    """Shared lifecycle: attach on train begin (1/GA scaling), log on ``on_log`` ahead of reporters, detach at end."""

    metric_prefix = ""
    injects_gradients = True

    def __init__(self, engine):
        self.engine = engine
        self._steps_in_epoch: int | None = None

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        _move_ahead_of_reporters(self)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None,
                       **kwargs):
        name = type(self).__name__
        if self.injects_gradients and args.fp16:
            raise ValueError(
                f"{name} does not support fp16 mixed precision: its gradient enters after the loss scaler and would "
                "be wrong by the loss scale. Train with bf16=True or in fp32."
            )
        if model is None:
            raise ValueError(f"{name} received no model in on_train_begin")
        _move_ahead_of_reporters(self)
        if not self.engine.attached:
            self.engine.attach(model)
        self._steps_in_epoch = _length(kwargs.get("train_dataloader"))
        self._set_scale(args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._set_scale(args, state)

    def _set_scale(self, args: TrainingArguments, state: TrainerState) -> None:
        if hasattr(self.engine, "grad_scale"):
            self.engine.grad_scale = accumulation_scale(args, state, self._steps_in_epoch)

    def _metrics(self) -> dict[str, float]:
        return self.engine.pop_metrics()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        report_metrics(self._metrics(), self.metric_prefix, logs, state)

    def on_train_end(self, args, state, control, **kwargs):
        self.engine.detach()


class KLToBaseCallback(_EngineCallback):
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


class LDIFSCallback(_EngineCallback):
    r"""LDIFS (feature-space distance to the frozen base, Mukhoti et al.) as a Trainer callback.

    .. math:: \lambda \sum_{\ell \in \text{layers}} \frac{1}{N} \sum_t \big\| h_\ell(t) - h^{ref}_\ell(t) \big\|^2

    :math:`h_\ell` is the output of decoder layer ℓ, :math:`h^{ref}_\ell` the reference's on the same tokens (the same
    PEFT model with its adapter disabled, or a frozen ``reference_model`` copy for full fine-tuning), t ranges over
    the N non-padding tokens of the micro-batch. Injected at the decoder-stack output by orthoreg's own engine (see
    ``LDIFSRegularizer``), divided by ``gradient_accumulation_steps``. Costs one extra no-grad forward up to the
    deepest guarded layer per micro-batch. Logged: ``ldifs/distance`` (the unweighted sum over layers),
    ``ldifs/total`` (weighted), and ``ldifs/distance/layer_i`` with ``per_layer_metrics=True``.

    Args:
        weight (`float`): λ.
        layers (`int | str | list`, *optional*, defaults to `"all"`): guarded layers (an index, a list, ``"all"``,
            ``"last_third"``, ``"a:b"`` fractions, …).
        reference_model (`nn.Module`, *optional*): frozen copy of the base model for full fine-tuning.
        mask (`str`, *optional*, defaults to `"attention"`): ``"attention"`` or ``"labels"`` tokens.
        per_layer_metrics (`bool`, *optional*, defaults to `False`).
        layers_path (`str`, *optional*): dotted path of the decoder-layer list, for unrecognised architectures.

    Example:
        >>> from orthoreg.baselines import LDIFSCallback
        >>> trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
        ...                   callbacks=[LDIFSCallback(0.01, layers="all")])
    """

    metric_prefix = "ldifs/"

    def __init__(self, weight: float, layers: Any = "all", reference_model: nn.Module | None = None,
                 mask: MaskPolicy = "attention", per_layer_metrics: bool = False, layers_path: str | None = None):
        super().__init__(LDIFSRegularizer(weight, layers=layers, reference_model=reference_model, mask=mask,
                                          per_layer_metrics=per_layer_metrics, layers_path=layers_path))

    @property
    def regularizer(self) -> LDIFSRegularizer:
        return self.engine


class CAFTCallback(_EngineCallback):
    r"""Concept Ablation Fine-Tuning (Casademunt et al.) as a Trainer callback.

    During training only, the guarded layers' outputs lose their component along the concept subspace
    :math:`U_\ell` (k, d, orthonormal rows):

    .. math:: h_\ell \leftarrow h_\ell - (h_\ell U_\ell^\top)\, U_\ell

    so fine-tuning cannot use (or strengthen through) those directions; evaluation and generation (eval mode) see the
    unmodified model, and the hooks are removed when training ends. See ``ConceptAblation`` for why the hook is safe
    under activation checkpointing. Logged: ``caft/removed``, the mean over tokens of :math:`\|U_\ell h_\ell\|^2`
    removed, summed over guarded layers.

    Args:
        directions (`HarmfulDirections`, `torch.Tensor` or `Mapping[int, torch.Tensor]`): the concept subspaces (a
            single tensor is used at every guarded layer).
        layers (`int | str | list`, *optional*): guarded layers; default: the layers the directions cover.
        layers_path (`str`, *optional*): dotted path of the decoder-layer list, for unrecognised architectures.

    Example:
        >>> from orthoreg import HarmfulDirections
        >>> from orthoreg.baselines import CAFTCallback
        >>> directions = HarmfulDirections.load("harmful.safetensors")
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[CAFTCallback(directions)])
    """

    metric_prefix = "caft/"
    injects_gradients = False

    def __init__(self, directions: HarmfulDirections | torch.Tensor | Mapping[int, torch.Tensor],
                 layers: Any = None, layers_path: str | None = None):
        super().__init__(ConceptAblation(directions, layers=layers, layers_path=layers_path))

    @property
    def ablation(self) -> ConceptAblation:
        return self.engine


# ====================================================================================== data and stopping
def interleave(task_dataset, aligned_dataset, fraction: float, seed: int = 0, replacement: bool = False):
    r"""Mixes aligned examples into the task data (the "interleaving" defence), deterministically.

    The result holds every task example plus :math:`n_a = \mathrm{round}\big(n_{task} \cdot f / (1 - f)\big)`
    aligned examples, so that a fraction ``f`` of it is aligned data, in an order shuffled by ``seed``. The aligned
    examples are drawn without replacement (``replacement=True`` allows repeats when the aligned set is smaller).

    Args:
        task_dataset (`datasets.Dataset` or a sequence of examples): the narrow task.
        aligned_dataset (`datasets.Dataset` or a sequence of examples): aligned examples in the same format.
        fraction (`float`): f, in [0, 1).
        seed (`int`, *optional*, defaults to `0`): draws the aligned examples and the order.
        replacement (`bool`, *optional*, defaults to `False`).

    Returns:
        A ``datasets.Dataset`` when ``task_dataset`` is one (columns must match), otherwise a list.

    Example:
        >>> mixed = interleave(task, aligned, fraction=0.1, seed=0)  # 10% aligned
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ValueError(f"`fraction` is the share of aligned examples in the result, in [0, 1); got {fraction!r}")
    n_task = len(task_dataset)
    n_aligned = round(n_task * fraction / (1 - fraction))
    if n_aligned > 0 and len(aligned_dataset) == 0:
        raise ValueError("`aligned_dataset` is empty; nothing to interleave")
    if n_aligned > len(aligned_dataset) and not replacement:
        raise ValueError(
            f"interleaving {fraction:.0%} aligned data into {n_task} task examples needs {n_aligned} aligned "
            f"examples but `aligned_dataset` has {len(aligned_dataset)}; lower `fraction`, add aligned data, or pass "
            "replacement=True to repeat examples"
        )
    rng = random.Random(seed)
    if replacement:
        picks = [rng.randrange(len(aligned_dataset)) for _ in range(n_aligned)]
    else:
        picks = rng.sample(range(len(aligned_dataset)), n_aligned)
    order = list(range(n_task + n_aligned))
    rng.shuffle(order)

    try:
        from datasets import Dataset, concatenate_datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        Dataset = None
    if Dataset is not None and isinstance(task_dataset, Dataset):
        aligned = aligned_dataset
        if not isinstance(aligned, Dataset):
            aligned = Dataset.from_list([dict(aligned[i]) for i in range(len(aligned))])
        if set(aligned.column_names) != set(task_dataset.column_names):
            raise ValueError(
                f"task and aligned datasets have different columns ({sorted(task_dataset.column_names)} vs "
                f"{sorted(aligned.column_names)}); format both the same way before interleaving"
            )
        aligned = aligned.select_columns(task_dataset.column_names).select(picks)
        aligned = aligned.cast(task_dataset.features) if aligned.features != task_dataset.features else aligned
        return concatenate_datasets([task_dataset, aligned]).select(order)
    examples = [task_dataset[i] for i in range(n_task)] + [aligned_dataset[i] for i in picks]
    return [examples[i] for i in order]


class EarlyStoppingOnMetric(TrainerCallback):
    """Stops training once a logged or evaluated metric crosses a threshold (e.g. the task is learned).

    Checked on every ``on_log`` (training logs such as ``loss``) and ``on_evaluate`` (``eval_*`` metrics). When the
    metric is at or beyond ``threshold`` on ``patience`` consecutive checks, training stops after the current step
    (and, with ``save=True``, that step is checkpointed). Unlike ``transformers.EarlyStoppingCallback`` (which stops
    when an eval metric stops improving) this stops as soon as a target is reached: the early-stopping defence
    against emergent misalignment stops once the narrow task is learned, before training runs on.

    Args:
        metric (`str`): a key of the logs or eval metrics (``"loss"``, ``"eval_loss"``, ``"eval_accuracy"``, …);
            ``"x"`` also matches ``"eval_x"``.
        threshold (`float`): the target value.
        mode (`str`, *optional*, defaults to `"min"`): ``"min"`` stops when metric <= threshold, ``"max"`` when
            metric >= threshold.
        patience (`int`, *optional*, defaults to `1`): consecutive checks that must meet the target.
        save (`bool`, *optional*, defaults to `True`): checkpoint the step at which training stops.

    Attributes:
        stopped_step (`int | None`): the global step at which the target was met, or None.

    Example:
        >>> trainer = Trainer(..., callbacks=[EarlyStoppingOnMetric("eval_task_accuracy", 0.98, mode="max")])
    """

    def __init__(self, metric: str, threshold: float, mode: Literal["min", "max"] = "min", patience: int = 1,
                 save: bool = True):
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max'; got {mode!r}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be an int >= 1; got {patience!r}")
        self.metric, self.threshold, self.mode, self.patience, self.save = metric, float(threshold), mode, patience, save
        self.stopped_step: int | None = None
        self._hits = 0
        self._seen = False

    def _check(self, values: Mapping[str, Any] | None, state: TrainerState, control: TrainerControl) -> None:
        if not values:
            return
        key = self.metric if self.metric in values else f"eval_{self.metric}"
        value = values.get(key)
        if not isinstance(value, (int, float)):
            return
        self._seen = True
        met = value <= self.threshold if self.mode == "min" else value >= self.threshold
        self._hits = self._hits + 1 if met else 0
        if self._hits >= self.patience and self.stopped_step is None:
            self.stopped_step = state.global_step
            control.should_training_stop = True
            if self.save:
                control.should_save = True
            logger.info("EarlyStoppingOnMetric: %s = %.4g reached %.4g at step %d; stopping", key, value,
                        self.threshold, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._check(logs, state, control)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._check(metrics, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        if not self._seen:
            logger.warning(
                "EarlyStoppingOnMetric never saw %r in the logs or eval metrics; check the name (and that "
                "logging_steps/eval_strategy produce it)", self.metric,
            )

