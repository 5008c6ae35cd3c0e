"""Reference forwards: the base model's own activations on the training batch, for anchors and baselines.

A reference forward runs inside the training forward's pre-hook, with no grad, stopped after the deepest layer that
is needed. Three things make it a faithful reference:

- it is *marked* (``reference_forward()``), so no regulariser, monitor or firewall on the same model mistakes it for
  a training forward (two regularisers on one model — orthoreg's paired anchor and LDIFS — never capture each
  other's reference passes, nor close each other's sessions);
- it sees the **same dropout masks** as the training forward that follows: the RNG state of every device the stack
  lives on is saved before it and restored after it (``torch.random.fork_rng``), so the training forward draws the
  same masks again. Without this, a model with dropout (GPT-2: 0.1) reads as "moved" even with an untrained adapter,
  and a paired penalty fights dropout noise instead of the adapter;
- with a PEFT model whose LoRA dropout is > 0, the adapter-disabled reference does not call the adapters' dropout,
  so the training forward would consume more random numbers than the reference and its later masks would differ.
  ``replay_lora_dropout`` makes the reference call each active adapter's dropout on the same input in the same
  order (and discard the result), so every mask still matches.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any

import torch
from torch import nn

from .capture import DecoderStack, layer_hidden

__all__ = [
    "NO_GRAD_CHECKPOINT_WARNING",
    "capture_reference_layers",
    "find_peft_model",
    "lora_dropout_modules",
    "reference_forward",
    "reference_forward_active",
]

# torch warns on every no-grad forward through a checkpointed layer (transformers < 5.23); reference passes are that.
NO_GRAD_CHECKPOINT_WARNING = "None of the inputs have requires_grad=True"
STACK_INPUTS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "cache_position")
_reference_state = threading.local()


def reference_forward_active() -> bool:
    """Whether a reference forward (base activations or logits, no grad) is running in this thread."""
    return getattr(_reference_state, "depth", 0) > 0


@contextlib.contextmanager
def reference_forward():
    """Marks a reference forward in progress (shared by every regulariser and monitor on every model). A term's own
    differentiable forward on a batch that is not the task's (``AnchorKLCallback``'s anchors) is marked with it too:
    no other regulariser or monitor counts such a forward as a training step."""
    _reference_state.depth = getattr(_reference_state, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=NO_GRAD_CHECKPOINT_WARNING)
            yield
    finally:
        _reference_state.depth -= 1


def find_peft_model(model: nn.Module) -> nn.Module | None:
    """The PEFT model inside ``model`` (looking through DDP/DeepSpeed ``.module`` wrappers), or ``None``."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "disable_adapter") and hasattr(model, "get_base_model"):
            return model
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return None


def lora_dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The PEFT LoRA layers of ``model`` whose dropout draws random numbers (p > 0) for some adapter."""
    out = []
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict) and hasattr(module, "lora_A"):
            if any(isinstance(d, nn.Dropout) and d.p > 0 for d in dropouts.values()):
                out.append(module)
    return out


def _replay_dropout_hook(module: nn.Module, args: tuple, output: Any) -> None:
    # The same calls, on the same input and in the same order, as PEFT's LoRA forward makes when the adapter is on:
    # base layer first (no random numbers), then each active adapter's dropout on the input cast to lora_A's dtype.
    if not module.training or not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        dropout = module.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            dropout(x.to(module.lora_A[adapter].weight.dtype))
    return None


class StopReferenceForward(Exception):
    """Raised inside the reference forward once the deepest needed layer has run."""


def _stack_devices(stack: DecoderStack) -> list[int]:
    return sorted({p.device.index or 0 for p in stack.stack.parameters() if p.device.type == "cuda"})


@torch.no_grad()
def capture_reference_layers(
    stack: DecoderStack,
    layer_indices: list[int],
    inputs: dict[str, Any],
    transform=None,
    *,
    replay_lora_dropout: list[nn.Module] | None = None,
) -> dict[int, torch.Tensor]:
    """A reference forward of ``stack``'s decoder on ``inputs`` (the LM's forward kwargs).

    No grad, marked with ``reference_forward()``, stopped after the deepest of ``layer_indices``, and run between a
    save and a restore of the RNG state (CPU and the stack's CUDA devices), so the training forward that follows
    draws the same dropout masks. ``replay_lora_dropout`` (see ``lora_dropout_modules``): LoRA layers whose dropout
    the reference must call as the adapter-enabled forward does, so masks stay aligned with LoRA dropout > 0.

    Returns those layers' outputs, detached (or ``transform(index, h)`` of each; a layer is left out when it returns
    ``None``).
    """
    captured: dict[int, torch.Tensor] = {}
    deepest = max(layer_indices)

    def make_hook(index: int):
        def hook(module, args, output):
            if index not in captured:
                value = layer_hidden(output).detach()
                value = value if transform is None else transform(index, value)
                if value is not None:
                    captured[index] = value
            if index == deepest:
                raise StopReferenceForward

        return hook

    hooks = [stack.layers[i].register_forward_hook(make_hook(i)) for i in layer_indices]
    hooks += [m.register_forward_hook(_replay_dropout_hook) for m in replay_lora_dropout or ()]
    stack_inputs = {k: v for k, v in inputs.items() if k in STACK_INPUTS and v is not None}
    try:
        with torch.random.fork_rng(devices=_stack_devices(stack)), reference_forward():
            stack.stack(**stack_inputs, use_cache=False)
    except StopReferenceForward:
        pass
    finally:
        for h in hooks:
            h.remove()
    return captured
