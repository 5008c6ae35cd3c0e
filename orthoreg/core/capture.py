"""Finding the decoder layers of any Hugging Face causal LM, choosing layers, and building token masks.

Layer discovery is structural: the decoder layers are the longest homogeneous ``nn.ModuleList`` whose length equals
the config's layer count (``num_hidden_layers``/``n_layer``/``num_layers``), preferring lists of
``GradientCheckpointingLayer``. That finds ``model.layers`` (Llama, Mistral, Qwen2, Gemma, Phi3, OLMo),
``transformer.h`` (GPT-2), ``gpt_neox.layers`` (GPT-NeoX) with no per-family table, and keeps working when the
layers are wrapped (PEFT, DDP, DeepSpeed, FSDP1 wrappers, FSDP2's in-place class swap) because none of those change
the list's length or homogeneity.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn

MaskPolicy = str  # "attention" | "labels" | "prompt_end"
MASK_POLICIES = ("attention", "labels", "prompt_end")

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "dim")

# Named layer selections; each is a half-open fraction range of the layer stack.
LAYER_ALIASES: dict[str, tuple[Fraction, Fraction]] = {
    "all": (Fraction(0), Fraction(1)),
    "first_half": (Fraction(0), Fraction(1, 2)),
    "last_half": (Fraction(1, 2), Fraction(1)),
    "first_third": (Fraction(0), Fraction(1, 3)),
    "middle_third": (Fraction(1, 3), Fraction(2, 3)),
    "last_third": (Fraction(2, 3), Fraction(1)),
}


class UnsupportedArchitectureError(ValueError):
    """Raised when no decoder-layer stack can be found in a model."""


@dataclass(frozen=True)
class DecoderStack:
    """Where a causal LM keeps its decoder layers.

    Attributes:
        lm: the unwrapped causal LM (PEFT/DDP/DeepSpeed/compile wrappers removed); it receives the batch kwargs.
        stack: the module that owns ``layers`` and runs them (e.g. ``LlamaModel``); its forward ends once per
            model forward, outside any activation checkpoint.
        layers: the decoder layers; ``layers[i]``'s output is the residual stream after block ``i``.
        path: dotted path of ``layers`` inside ``lm``, for messages.
        hidden_size: width d of the residual stream.
        model_type: ``config.model_type`` (or the class name) for messages and metadata.
    """

    lm: nn.Module
    stack: nn.Module
    layers: nn.ModuleList
    path: str
    hidden_size: int
    model_type: str

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strips DDP/DeepSpeed/FSDP1 (``.module``), ``torch.compile`` (``._orig_mod``), PEFT and ``OrthoLoRA``
    wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif getattr(type(model), "_orthoreg_wrapper", False) and isinstance(getattr(model, "model", None), nn.Module):
            model = model.model
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif type(model).__name__ in {"DistributedDataParallel", "DeepSpeedEngine", "FullyShardedDataParallel",
                                      "DataParallel", "PipelineEngine"} and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module
    return model


def _config_value(config: Any, keys: Sequence[str]) -> int | None:
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _is_checkpointing_layer(module: nn.Module) -> bool:
    return any(cls.__name__ == "GradientCheckpointingLayer" for cls in type(module).__mro__)


def _layer_kind(module: nn.Module) -> type:
    # FSDP1 wraps each layer; compare what is inside so mixed wrapping still reads as homogeneous.
    inner = getattr(module, "_fsdp_wrapped_module", None)
    return type(inner) if isinstance(inner, nn.Module) else type(module)


def check_causal_decoder(lm: nn.Module, config: Any, model_type: str) -> None:
    """Refuses models whose layers are not a causal decoder's: encoder-decoder models (T5, BART: the structural
    search would take the encoder's blocks for the decoder stack) and bidirectional encoders (BERT, RoBERTa, …
    unless configured ``is_decoder=True``). orthoreg's directions and penalties are defined on the residual stream of
    a causal LM at the tokens it generates from.

    Raises:
        UnsupportedArchitectureError: naming the model and what orthoreg supports.
    """
    if config is None:
        return
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{type(lm).__name__} (model_type={model_type!r}) is an encoder-decoder model; orthoreg regularises the "
            "decoder layers of causal language models (Llama, Mistral, Qwen, Gemma, GPT-2, …). Encoder-decoder "
            "models are not supported."
        )
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - transformers always has it
        return
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise UnsupportedArchitectureError(
            f"{type(lm).__name__} (model_type={model_type!r}) is a bidirectional encoder (is_decoder=False): its "
            "tokens see the future, so it has no generation-time residual stream for orthoreg to guard. Use a causal "
            "language model, or configure the model as a decoder (is_decoder=True)."
        )


def find_decoder_stack(model: nn.Module, layers_path: str | None = None) -> DecoderStack:
    """Locates the decoder layers of a (possibly wrapped) causal LM.

    Args:
        model: a ``PreTrainedModel``, a ``PeftModel``, or either wrapped by DDP/DeepSpeed/FSDP/``torch.compile``.
        layers_path: dotted path to the layer ``ModuleList`` inside the unwrapped LM, for architectures the
            structural search cannot recognise (e.g. ``"model.layers"``).

    Raises:
        UnsupportedArchitectureError: no homogeneous layer list matching the config's layer count exists.
    """
    lm = unwrap_model(model)
    config = getattr(lm, "config", None)
    model_type = getattr(config, "model_type", None) or type(lm).__name__
    check_causal_decoder(lm, config, model_type)
    expected = _config_value(config, _LAYER_COUNT_KEYS)
    modules = dict(lm.named_modules())

    if layers_path is not None:
        layers = modules.get(layers_path)
        if not isinstance(layers, nn.ModuleList):
            raise UnsupportedArchitectureError(
                f"`layers_path={layers_path!r}` does not name an nn.ModuleList in {type(lm).__name__}; "
                f"ModuleLists present: {[n for n, m in modules.items() if isinstance(m, nn.ModuleList)][:10]}"
            )
        path = layers_path
    else:
        candidates = []
        for name, module in modules.items():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            kinds = {_layer_kind(child) for child in module}
            if len(kinds) != 1 or not any(True for _ in module[0].parameters()):
                continue
            score = (
                expected is not None and len(module) == expected,
                _is_checkpointing_layer(module[0]),
                -name.count("."),  # outermost list wins over lists nested inside layers (MoE experts)
                len(module),
            )
            candidates.append((score, name, module))
        matching = [c for c in candidates if expected is None or len(c[2]) == expected]
        if not matching:
            raise UnsupportedArchitectureError(
                f"Could not find the decoder layers of {type(lm).__name__} (model_type={model_type!r}): no "
                f"homogeneous nn.ModuleList of length {expected} (the config's layer count). "
                "Pass `layers_path=` (e.g. 'model.layers') in OrthoRegConfig to name it."
            )
        _, path, layers = max(matching, key=lambda c: c[0])

    parent_path = path.rsplit(".", 1)[0] if "." in path else ""
    stack = modules[parent_path]
    hidden_size = _config_value(config, _HIDDEN_SIZE_KEYS)
    if hidden_size is None:
        raise UnsupportedArchitectureError(
            f"{type(lm).__name__}'s config has none of {_HIDDEN_SIZE_KEYS}; cannot tell the residual-stream width."
        )
    return DecoderStack(lm=lm, stack=stack, layers=layers, path=path, hidden_size=hidden_size, model_type=model_type)


def resolve_layers(spec: int | str | Sequence[int | str], num_layers: int) -> list[int]:
    """Turns a layer selection into sorted, unique, non-negative indices.

    Accepted forms: an index (``5``), a negative index (``-1`` is the last layer), a list of those, a named range
    (``"all"``, ``"last_third"``, ``"middle_third"``, ``"first_half"``, … see ``LAYER_ALIASES``), or a fraction
    slice ``"a:b"`` of the stack (``"2/3:"`` = the last third, ``"0.25:0.5"``). Fraction ranges select
    ``floor(a·L) <= i < ceil(b·L)``, and never select nothing.

    Raises:
        ValueError: an index is out of range or the form is not recognised.
    """
    if isinstance(spec, (int, str)):
        spec = [spec]
    indices: set[int] = set()
    for item in spec:
        if isinstance(item, bool):
            raise ValueError(f"layer selection {item!r} is a bool; give an index, a list, or a named range")
        if isinstance(item, int):
            index = item + num_layers if item < 0 else item
            if not 0 <= index < num_layers:
                raise ValueError(
                    f"layer index {item} is out of range for a model with {num_layers} decoder layers "
                    f"(valid: {-num_layers}..{num_layers - 1})"
                )
            indices.add(index)
            continue
        if not isinstance(item, str):
            raise ValueError(f"layer selection {item!r} must be an int, a str or a list of those")
        text = item.strip()
        if text.lstrip("-").isdigit():
            indices.update(resolve_layers(int(text), num_layers))
            continue
        if text in LAYER_ALIASES:
            start, stop = LAYER_ALIASES[text]
        elif ":" in text:
            try:
                lo, hi = text.split(":")
                start = Fraction(lo) if lo else Fraction(0)
                stop = Fraction(hi) if hi else Fraction(1)
            except ValueError as err:
                raise ValueError(f"cannot parse layer range {item!r}; expected 'a:b' with fractions in [0, 1]") from err
            if not 0 <= start < stop <= 1:
                raise ValueError(f"layer range {item!r} must satisfy 0 <= a < b <= 1")
        else:
            raise ValueError(
                f"unknown layer selection {item!r}; use an index, a list, 'a:b' fractions, or one of "
                f"{sorted(LAYER_ALIASES)}"
            )
        first = int(start * num_layers)  # floor
        last = max(first + 1, -(-stop.numerator * num_layers // stop.denominator))  # ceil, at least one layer
        indices.update(range(first, min(last, num_layers)))
    return sorted(indices)


def layer_hidden(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's output (a Tensor, or a tuple whose first item is one)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the hidden state in a decoder layer output of type {type(output).__name__}")


def batch_shape(inputs: dict[str, Any]) -> tuple[int, int] | None:
    """(B, T) of a forward call's batch, from its ``input_ids``/``inputs_embeds``/``attention_mask``/``labels``."""
    for key in ("input_ids", "inputs_embeds", "attention_mask", "labels"):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0]), int(value.shape[1])
    return None


def bind_forward_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Names the positional arguments of a forward call, so masks are found however the trainer passes them."""
    if not args:
        return kwargs
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return kwargs
    return dict(bound.arguments)


def _mask_from_position_ids(position_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Real tokens of a padding-free (packed) batch.

    TRL pads packed rows on the right with position id 0, the id every sequence starts with, so a trailing token
    at position 0 is either padding or a sequence of length one. With ``labels`` (TRL sets -100 on padding *and* on
    every sequence start) the rule is exact for everything that trains: a row's real tokens run up to its last token
    that has a non-zero position or a label; a trailing length-one sequence has neither, carries no loss, and is
    treated as padding. Without labels the first token after the last non-zero position is counted as real (it may
    be a length-one sequence), so a padded row counts at most one padding token.
    """
    T = position_ids.shape[-1]
    idx = torch.arange(T, device=position_ids.device).expand_as(position_ids)
    if labels is not None and tuple(labels.shape) == tuple(position_ids.shape):
        real = (position_ids != 0) | (labels.to(position_ids.device) != -100)
        last_real = torch.where(real, idx, torch.full_like(idx, -1)).amax(dim=-1, keepdim=True)
        return idx <= last_real
    last_nonzero = torch.where(position_ids != 0, idx, torch.full_like(idx, -1)).amax(dim=-1, keepdim=True)
    mask = idx <= last_nonzero + 1
    all_zero = last_nonzero < 0
    return torch.where(all_zero, torch.ones_like(mask), mask)


def _prompt_end_mask(label_mask: torch.Tensor) -> torch.Tensor:
    """One True per labelled row, at the position before its first label (see ``token_mask``)."""
    has_label = label_mask.any(dim=1)
    first = label_mask.int().argmax(dim=1)
    if bool((has_label & (first == 0)).any()):
        raise ValueError(
            "mask='prompt_end' needs a prompt token before the answer, but a row's first label is at position 0 "
            "(every token is a target, as in plain language modelling). Mask the prompt's labels with -100 "
            "(completion-only loss), or use mask='labels'."
        )
    out = torch.zeros_like(label_mask)
    rows = has_label.nonzero().squeeze(1)
    out[rows, first[rows] - 1] = True
    return out


def token_mask(
    inputs: dict[str, Any],
    batch_shape: tuple[int, int],
    policy: MaskPolicy = "attention",
) -> torch.Tensor:
    """The (B, T) boolean mask of tokens that count for the penalties.

    - ``attention_mask`` (2D) when present; otherwise, for padding-free batches, from ``position_ids`` (and the
      labels, when present, which make the end of each row exact; see ``_mask_from_position_ids``); otherwise every
      token counts.
    - ``policy="labels"`` additionally keeps only tokens whose label is not -100 (labels as passed to the model,
      aligned with ``input_ids``).
    - ``policy="prompt_end"`` keeps, per row, only the last prompt token: the token just before the row's first
      label that is not -100 (the position whose output predicts the first answer token — where a chat model
      decides whether to comply or refuse, and where ``extract_directions(pooling="last")`` reads its
      directions). Rows with no label (all -100) contribute no token.

    Raises:
        ValueError: ``policy="labels"``/``"prompt_end"`` but the batch carries no labels, a row whose first label
            is at position 0 (no prompt token before it), or a mask of the wrong shape.
    """
    if policy not in MASK_POLICIES:
        raise ValueError(f"mask policy {policy!r} is not one of {MASK_POLICIES}")
    B, T = batch_shape
    attention_mask = inputs.get("attention_mask")
    position_ids = inputs.get("position_ids")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        mask = attention_mask.bool()
    elif isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 and position_ids.shape[0] == B:
        labels = inputs.get("labels")
        mask = _mask_from_position_ids(position_ids, labels if isinstance(labels, torch.Tensor) else None)
    else:
        mask = None
    if mask is not None and tuple(mask.shape) != (B, T):
        raise ValueError(f"token mask has shape {tuple(mask.shape)} but the hidden states are {(B, T)}")
    if policy in ("labels", "prompt_end"):
        labels = inputs.get("labels")
        if not isinstance(labels, torch.Tensor):
            raise ValueError(
                f"OrthoRegConfig(mask={policy!r}) but this forward call carries no `labels` (DPOTrainer and "
                "prediction steps do not pass them). Use mask='attention' for this trainer."
            )
        if tuple(labels.shape) != (B, T):
            raise ValueError(f"labels have shape {tuple(labels.shape)} but the hidden states are {(B, T)}")
        label_mask = labels != -100
        if policy == "prompt_end":
            label_mask = _prompt_end_mask(label_mask if mask is None else mask & label_mask)
        mask = label_mask if mask is None else mask & label_mask
    if mask is None:
        return torch.ones(B, T, dtype=torch.bool)
    return mask
