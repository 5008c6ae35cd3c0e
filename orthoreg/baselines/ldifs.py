r"""LDIFS: :math:`\lambda \sum_\ell \mathrm{mean}_t \|h_\ell - h_\ell^{ref}\|^2`, injected at the decoder-stack
output by ``OrthoRegularizer``'s engine."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..config import OrthoRegConfig
from ..core.capture import find_decoder_stack
from ..engine.regularizer import (
    NO_GRAD_CHECKPOINT_WARNING,
    NonFiniteHiddenStateError,
    OrthoRegularizer,
    capture_reference_layers,
    find_peft_model,
    reference_forward_active,
)
from ..terms.penalties import select_tokens
from .common import (
    EngineCallback,
    MaskPolicy,
    call_kwargs,
    check_mask,
    check_weight,
    no_reference_error,
    prepare_reference_model,
)

__all__ = ["LDIFSCallback", "LDIFSRegularizer", "feature_distance"]


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
        weight = check_weight("weight", weight)
        # The engine's config carries layers/mask/paths; its cov/proj weights are unused (``_penalty`` is replaced),
        # cov_weight only satisfies OrthoRegConfig's "some weight > 0" check.
        config = OrthoRegConfig(layers=layers, cov_weight=weight, proj_weight=0.0, anchor="absolute",
                                mask=check_mask(mask), per_layer_metrics=per_layer_metrics, layers_path=layers_path)
        super().__init__(config, directions=None, mode="inject")
        self.weight = weight
        self.reference_model = reference_model
        self._ref_stack = None

    def attach(self, model: nn.Module) -> LDIFSRegularizer:
        """Installs the hooks; see ``OrthoRegularizer.attach``.

        Raises:
            ValueError: no reference is available, or ``reference_model`` has another shape or is not independent.
        """
        if self.reference_model is None and find_peft_model(model) is None:
            raise no_reference_error("LDIFSCallback")
        ref_stack = None
        if self.reference_model is not None:
            prepare_reference_model(self.reference_model, model, "LDIFSCallback")
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
        return capture_reference_layers(self._ref_stack, self.layer_indices, call_kwargs(lm, args, kwargs))

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


class LDIFSCallback(EngineCallback):
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

