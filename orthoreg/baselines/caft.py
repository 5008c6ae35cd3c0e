r"""CAFT-style concept ablation: :math:`h_\ell \leftarrow h_\ell - (h_\ell U_\ell^\top) U_\ell` at the guarded layers'
outputs, in training forwards only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..core.bases import orthonormalize
from ..core.capture import bind_forward_inputs, find_decoder_stack, layer_hidden, resolve_layers, token_mask
from ..directions.harmful import DirectionsError, HarmfulDirections
from ..engine.regularizer import batch_shape
from .common import EngineCallback

__all__ = ["CAFTCallback", "ConceptAblation"]


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
            self._shared = orthonormalize(u, name="CAFT directions", error=DirectionsError)
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
            shape = batch_shape(inputs)
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


class CAFTCallback(EngineCallback):
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

