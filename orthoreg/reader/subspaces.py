r"""Input subspaces :math:`V_m` for the reader-side weight penalty: the container and its file format.

``InputSubspaces({module_name: V})`` holds, per linear module m of a causal LM, an orthonormal (k × d_in) basis V_m of
the module's *inputs* on chosen prompts and positions. Module names are those of the unwrapped base model's
``named_modules()`` (``model.layers.3.mlp.up_proj``); the same object fits that model bare, PEFT-wrapped
(``base_model.model.`` prefixes and ``.base_layer`` suffixes are mapped) or wrapped by DDP/FSDP1.

``orthoreg.reader.extraction.extract_input_subspaces`` records them from a base model; ``orthoreg.reader.penalty`` holds
the penalty that uses them.

**File format** (``format_version`` 1): one safetensors file, tensor key = module name, value = V_m (k × d_in,
float32, orthonormal rows); the metadata key ``"orthoreg_input_subspaces"`` holds a JSON object with
``format_version``, ``modules`` ({name: [k, d_in]}), ``k`` and the provenance (``source_model``, ``method``,
``prompt_set``, ``positions``, …). ``save_pretrained(folder)`` writes that file plus a readable JSON card. No pickle
is ever read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.bases import BasesError, BasesFormat, OrthonormalBases, is_orthonormal, orthonormalize
from ..core.capture import unwrap_model
from ..core.layers import in_width

__all__ = [
    "CARD_NAME",
    "SUBSPACES_NAME",
    "InputSubspaces",
    "InputSubspacesError",
    "canonical_module_name",
    "named_input_modules",
]

FORMAT_VERSION = 1
SUBSPACES_NAME = "input_subspaces.safetensors"
CARD_NAME = "input_subspaces.json"
# Name components that wrappers insert without changing the model (FSDP1, activation-checkpoint wrappers, compile).
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_WRAPPER_PREFIXES = ("base_model.model.", "module.")
# PEFT's adapter matrices: linear modules inside a LoraLayer that the base model does not have.
_ADAPTER_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"})


class InputSubspacesError(BasesError):
    """An input-subspace set or file is unusable (bad tensor, unknown module, wrong width, corrupt file)."""


# ------------------------------------------------------------------------------------------------ module names
def canonical_module_name(name: str) -> str:
    """``name`` as in the unwrapped base model: PEFT's ``base_model.model.`` prefix, DDP's ``module.``, FSDP1 /
    checkpoint-wrapper components and PEFT's ``.base_layer`` suffix removed."""
    for prefix in _WRAPPER_PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix):]
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    while parts and parts[-1] == "base_layer":
        parts.pop()
    return ".".join(parts)


def named_input_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical name → module for every linear-like module of the unwrapped model (a PEFT ``LoraLayer`` wins over
    its own ``base_layer``, which has the same canonical name; the adapter's own A and B are not modules of the
    base model)."""
    found: dict[str, nn.Module] = {}
    for name, module in unwrap_model(model).named_modules():
        if in_width(module) is not None and not _ADAPTER_PARTS.intersection(name.split(".")):
            found.setdefault(canonical_module_name(name), module)
    return found


# ------------------------------------------------------------------------------------------------ the container
class InputSubspaces(OrthonormalBases):
    """Per-module orthonormal bases V_m (k × d_in) of a model's inputs; rows orthonormalised by QR on construction.

    Args:
        subspaces (`Mapping[str, torch.Tensor]`): module name (as in the unwrapped base model's ``named_modules()``;
            wrapper prefixes are removed) → V_m, (k, d_in) or (d_in,). Each must be finite with 1 ≤ k ≤ d_in and
            full rank.
        metadata (`dict`, *optional*): provenance: ``source_model``, ``method``, ``prompt_set``, ``positions``, …

    Example:
        >>> subspaces = extract_input_subspaces(model, tokenizer, prompts, positions="post_instruction", k=16)
        >>> subspaces.save_pretrained("reader_subspaces")
        >>> subspaces = InputSubspaces.from_pretrained("reader_subspaces", model=model)
        >>> subspaces.push_to_hub("my-org/my-model-reader-subspaces")  # then from_pretrained("my-org/…") anywhere

    Raises:
        InputSubspacesError: empty mapping, a non-string name, two names for one module, or a bad tensor (the
            message names the module).
    """

    FORMAT: ClassVar[BasesFormat] = BasesFormat(
        kind="input-subspaces", metadata_key="orthoreg_input_subspaces", version=FORMAT_VERSION,
        weights_name=SUBSPACES_NAME, card_name=CARD_NAME, structural_keys=("format_version", "k", "modules"),
        create_hint="`extract_input_subspaces(...).save_pretrained(PATH)` or `InputSubspaces.save(PATH)`",
        tags=("orthoreg", "input-subspaces"),
    )
    error: ClassVar[type[BasesError]] = InputSubspacesError

    def __init__(self, subspaces: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None):
        if not isinstance(subspaces, Mapping) or not subspaces:
            raise InputSubspacesError("InputSubspaces needs at least one module: {module_name: (k, d_in) tensor}")
        cleaned: dict[str, torch.Tensor] = {}
        for raw_name, v in subspaces.items():
            if not isinstance(raw_name, str) or not raw_name:
                raise InputSubspacesError(f"module names must be non-empty strings; got {raw_name!r}")
            name = canonical_module_name(raw_name)
            if name in cleaned:
                raise InputSubspacesError(f"{raw_name!r} and another key both name the module {name!r}")
            v = torch.as_tensor(v)
            if v.dim() == 1:
                v = v.unsqueeze(0)
            cleaned[name] = orthonormalize(v, name=f"input subspace of {name!r}", error=InputSubspacesError)
        self.subspaces = dict(sorted(cleaned.items()))
        self.metadata = dict(metadata or {})

    @property
    def bases(self) -> dict[str, torch.Tensor]:
        return self.subspaces

    @property
    def names(self) -> list[str]:
        return list(self.subspaces)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.subspaces[canonical_module_name(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonical_module_name(name) in self.subspaces

    def __repr__(self) -> str:
        return f"InputSubspaces({len(self)} modules, k={self.k}, method={self.metadata.get('method')!r})"

    def resolve(self, model: nn.Module) -> dict[str, nn.Module]:
        """Name → module of ``model`` for every subspace, checking each in-width.

        Raises:
            InputSubspacesError: a name is not a linear module of ``model`` (lists close matches), or its input width
                differs from V's (names the module, expected and actual width).
        """
        available = named_input_modules(model)
        resolved: dict[str, nn.Module] = {}
        for name, v in self.subspaces.items():
            module = available.get(name)
            if module is None:
                leaf = name.rsplit(".", 1)[-1]
                close = [n for n in available if n.endswith("." + leaf)][:4]
                raise InputSubspacesError(
                    f"the input subspaces name {name!r}, which is not a linear module of {type(unwrap_model(model)).__name__}"
                    f"{f' (similar: {close})' if close else ''}; names must be as in the base model's "
                    "named_modules() (e.g. 'model.layers.3.mlp.up_proj'). Extract the subspaces from this model."
                )
            width = in_width(module)
            if width != v.shape[1]:
                raise InputSubspacesError(
                    f"the input subspace of {name!r} is {v.shape[1]} wide but that module reads {width} inputs; "
                    "these subspaces come from another model (extract them from this one)"
                )
            resolved[name] = module
        return resolved

    # -------------------------------------------------------------------------------------------- files
    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.subspaces)

    def file_metadata(self) -> dict[str, Any]:
        return {**self.metadata, "format_version": FORMAT_VERSION, "k": self.k,
                "modules": {n: list(v.shape) for n, v in self.subspaces.items()}}

    def card(self) -> dict[str, Any]:
        """The file metadata, with each module's k and d_in spelled out for people."""
        card = super().card()
        card["modules"] = {n: {"k": int(v.shape[0]), "in_features": int(v.shape[1])}
                           for n, v in self.subspaces.items()}
        return card

    @classmethod
    def from_file(cls, path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> InputSubspaces:
        listed = meta.get("modules")
        if not isinstance(listed, dict) or sorted(listed) != sorted(tensors):
            raise InputSubspacesError(
                f"{path!r}: tensors for {sorted(tensors)[:4]}… but the metadata lists "
                f"{sorted(listed)[:4] if isinstance(listed, dict) else listed!r}…; the file is corrupt"
            )
        for name, v in tensors.items():
            if v.dim() != 2 or list(v.shape) != list(listed[name]) or not is_orthonormal(v):
                raise InputSubspacesError(
                    f"{path!r}: the subspace of {name!r} (shape {list(v.shape)}, listed {listed[name]}) is not a set "
                    "of orthonormal rows; the file is corrupt"
                )
        meta = {key: value for key, value in meta.items() if key not in ("format_version", "k", "modules")}
        return cls(tensors, metadata=meta)

    def check_model(self, model: nn.Module) -> None:
        self.resolve(model)
