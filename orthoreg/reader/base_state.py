"""What the reader term records of the base model, per penalised module, and carries across a resume.

- **W₀V_mᵀ** (full fine-tuning; d_out × k, float32): the read-out the term compares against, from the weights before
  the first update. LoRA needs none: ΔW = s·B·A is the update itself.
- **b₀** (full fine-tuning, when the module's bias trains): a trained bias shifts every read-out of span(V_m), so it
  is part of the term, as the read-out of a constant input: reader(m) = ‖W_m V_mᵀ − W₀V_mᵀ‖²_F + ‖b_m − b₀‖².
  (Under LoRA a base bias that trains — PEFT ``bias="all"``/``"lora_only"`` — is refused by name: it lives in the
  base layer, outside the adapted module's own gathered region under ZeRO-3.)
- **‖W₀V_mᵀ‖²_F (+ ‖b₀‖²)** (``units="base"``): the base read-out each module's term is divided by; a read-out that is
  ~0 (``BASE_READOUT_FLOOR`` of a random subspace's) is refused by name.

Everything is recorded from unsharded weights: at attach when they are whole, else inside the module's (or, for
LoRA, its base layer's) first forward, where ZeRO-3 has gathered and FSDP2 unsharded them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..core.layers import check_gathered, is_conv1d, is_lora_layer, is_sharded
from ..terms.reader import BASE_READOUT_FLOOR, base_readout, weight_times_basis
from .subspaces import InputSubspacesError

__all__ = ["ReaderBaseState", "trainable_bias"]

_BIAS_SUFFIX = "#bias"  # key of b₀ in the safetensors reference state (module names hold no '#')


def trainable_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias of a linear module when it trains (``None`` otherwise)."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) and bias.requires_grad else None


class ReaderBaseState:
    """Per-module records of the base model (module docstring) for a ``ReaderPenalty``.

    Args:
        basis (`Callable[[str, torch.device], torch.Tensor]`): V_m of a module, float32 on a device.
        units (`str`): ``"absolute"`` or ``"base"`` (whether read-outs are recorded).
    """

    def __init__(self, basis: Callable[[str, torch.device], torch.Tensor], units: str):
        self.basis, self.units = basis, units
        self.products: dict[str, torch.Tensor] = {}
        self.biases: dict[str, torch.Tensor] = {}
        self.readouts: dict[str, torch.Tensor] = {}

    def tensors(self) -> list[torch.Tensor]:
        return [*self.products.values(), *self.biases.values(), *self.readouts.values()]

    def recorded(self, name: str, kind: str) -> bool:
        """Whether everything ``kind``'s term needs of module ``name`` is recorded."""
        if kind == "full" and name not in self.products:
            return False
        return self.units != "base" or name in self.readouts

    @staticmethod
    def refuse_lora_bias(name: str, module: nn.Module) -> None:
        """A LoRA module whose base bias trains is refused (module docstring)."""
        if is_lora_layer(module) and trainable_bias(module.get_base_layer()) is not None:
            raise NotImplementedError(
                f"{name!r} trains its base layer's bias (PEFT `bias='all'` or `'lora_only'`): a trained bias shifts "
                "how the module reads span(V), which the reader term over LoRA's A and B does not cover. Use "
                "LoraConfig(bias='none'), or leave this module out of the input subspaces"
            )

    @torch.no_grad()
    def record_full(self, name: str, module: nn.Module) -> None:
        """W₀V_mᵀ, b₀ when the bias trains, and (base units) the read-out, of a full fine-tuning module."""
        weight = module.weight
        self.products[name] = weight_times_basis(weight, self.basis(name, weight.device), is_conv1d(module)).clone()
        bias = trainable_bias(module)
        if bias is not None:
            self.biases[name] = bias.detach().float().clone()
        if self.units == "base":
            self.record_readout(name, module, weight)

    @torch.no_grad()
    def record_readout(self, name: str, module: nn.Module, weight: torch.Tensor) -> None:
        """‖W₀Vᵀ‖²_F (+ ‖b₀‖² when the bias trains) of ``module``'s unsharded base weight, refused by name when ~0
        or not finite."""
        if not weight.is_floating_point():
            raise NotImplementedError(
                f"{name!r} has a {weight.dtype} (quantised) base weight; units='base' reads ‖W₀Vᵀ‖² from it. Use "
                "units='absolute' with a quantised base model"
            )
        basis = self.basis(name, weight.device)
        readout, random_readout = base_readout(weight, basis, is_conv1d(module), self.products.get(name))
        if name in self.biases:
            readout = readout + self.biases[name].to(readout.device).square().sum()
        if not bool(torch.isfinite(readout)) or not bool(readout > BASE_READOUT_FLOOR * random_readout):
            raise InputSubspacesError(
                f"the base model reads almost nothing of span(V) at {name!r} (‖W₀Vᵀ‖²_F = {float(readout):.3g}, a "
                f"random {basis.shape[0]}-dimensional subspace would read {float(random_readout):.3g}), so a change "
                "relative to it is undefined: leave this module out of the input subspaces, or use units='absolute'"
            )
        self.readouts[name] = readout.detach().clone()

    def record_on_attach(self, name: str, kind: str, module: nn.Module) -> None:
        """Records what can be recorded now, from weights that are whole (the rest waits for a forward)."""
        if kind == "full" and name not in self.products and not is_sharded(module.weight):
            self.record_full(name, module)
        if kind == "lora" and self.units == "base" and name not in self.readouts:
            base_layer = module.get_base_layer()
            if not is_sharded(base_layer.weight):
                self.record_readout(name, base_layer, base_layer.weight)

    def base_layer_hook(self, name: str, module: nn.Module, args: tuple, output: object) -> None:
        """A forward hook on a LoRA module's base layer: its read-out, inside its own gathered region."""
        if name not in self.readouts:
            check_gathered(name, module.weight)
            self.record_readout(name, module, module.weight)

    # ---------------------------------------------------------------------------------------- the term's parts
    def full_bias_change(self, name: str, module: nn.Module) -> torch.Tensor | None:
        """‖b − b₀‖² of a full fine-tuning module whose bias trains (``None`` otherwise); float32."""
        if name not in self.biases:
            return None
        bias = module.bias
        return (bias.float() - self.biases[name].to(bias.device)).square().sum()

    def scale(self, name: str, device: torch.device, modules: int) -> torch.Tensor:
        """1 / (M · read-out) of the base-units term."""
        return 1.0 / (self.readouts[name].to(device) * modules)

    # ---------------------------------------------------------------------------------------- resume
    def state(self) -> dict[str, torch.Tensor]:
        """W₀V_mᵀ and b₀ per full-FT module (float32, CPU), safetensors-serialisable."""
        state = {name: t.detach().cpu().contiguous() for name, t in self.products.items()}
        state.update({name + _BIAS_SUFFIX: t.detach().cpu().contiguous() for name, t in self.biases.items()})
        return state

    def load(self, state: dict[str, torch.Tensor], known: list[str]) -> None:
        """Restores ``state()``; in base units the read-outs come from the restored W₀V_mᵀ (and b₀), not from the
        resumed weights."""
        names = {key.removesuffix(_BIAS_SUFFIX) for key in state}
        unknown = names - set(known)
        if unknown:
            raise InputSubspacesError(f"reference state for modules {sorted(unknown)[:4]} the subspaces do not name")
        self.products = {k: t.detach().to(torch.float32).clone() for k, t in state.items()
                         if not k.endswith(_BIAS_SUFFIX)}
        self.biases = {k.removesuffix(_BIAS_SUFFIX): t.detach().to(torch.float32).clone() for k, t in state.items()
                       if k.endswith(_BIAS_SUFFIX)}
        for name, product in self.products.items():
            readout = product.square().sum()
            if name in self.biases:
                readout = readout + self.biases[name].square().sum()
            self.readouts[name] = readout
