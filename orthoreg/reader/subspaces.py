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

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..core.capture import unwrap_model
from ..directions.harmful import DirectionsError, orthonormalize
from ..lora.writers import is_conv1d, is_lora_layer

__all__ = [
    "CARD_NAME",
    "SUBSPACES_NAME",
    "InputSubspaces",
    "InputSubspacesError",
    "canonical_module_name",
    "module_in_features",
    "named_input_modules",
]

FORMAT_VERSION = 1
SUBSPACES_NAME = "input_subspaces.safetensors"
CARD_NAME = "input_subspaces.json"
_META_KEY = "orthoreg_input_subspaces"
_ORTHONORMAL_TOL = 1e-4
# Name components that wrappers insert without changing the model (FSDP1, activation-checkpoint wrappers, compile).
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_WRAPPER_PREFIXES = ("base_model.model.", "module.")


class InputSubspacesError(DirectionsError):
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


def module_in_features(module: nn.Module) -> int | None:
    """d_in of a linear-like module (``nn.Linear``, ``Conv1D``, either wrapped by PEFT LoRA), else ``None``.
    Read from attributes, not weight shapes: under ZeRO-3 a weight may be a partitioned empty tensor."""
    if is_lora_layer(module):
        return getattr(module, "in_features", None)
    if isinstance(module, nn.Linear):
        return module.in_features
    if is_conv1d(module):
        return module.nx
    return None


def named_input_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical name → module for every linear-like module of the unwrapped model (a PEFT ``LoraLayer`` wins over
    its own ``base_layer``, which has the same canonical name)."""
    found: dict[str, nn.Module] = {}
    for name, module in unwrap_model(model).named_modules():
        if module_in_features(module) is not None:
            found.setdefault(canonical_module_name(name), module)
    return found


# ------------------------------------------------------------------------------------------------ the container
class InputSubspaces:
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

    Raises:
        InputSubspacesError: empty mapping, a non-string name, two names for one module, or a bad tensor (the
            message names the module).
    """

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
            try:
                cleaned[name] = orthonormalize(v, name=f"input subspace of {name!r}")
            except DirectionsError as err:
                raise InputSubspacesError(str(err)) from None
        self.subspaces = dict(sorted(cleaned.items()))
        self.metadata = dict(metadata or {})

    @property
    def names(self) -> list[str]:
        return list(self.subspaces)

    @property
    def k(self) -> int:
        return max(v.shape[0] for v in self.subspaces.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.subspaces[canonical_module_name(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and canonical_module_name(name) in self.subspaces

    def __iter__(self) -> Iterator[str]:
        return iter(self.subspaces)

    def __len__(self) -> int:
        return len(self.subspaces)

    def items(self):
        return self.subspaces.items()

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
            width = module_in_features(module)
            if width != v.shape[1]:
                raise InputSubspacesError(
                    f"the input subspace of {name!r} is {v.shape[1]} wide but that module reads {width} inputs; "
                    "these subspaces come from another model (extract them from this one)"
                )
            resolved[name] = module
        return resolved

    # -------------------------------------------------------------------------------------------- files
    def _file_metadata(self) -> dict[str, Any]:
        return {**self.metadata, "format_version": FORMAT_VERSION, "k": self.k,
                "modules": {n: list(v.shape) for n, v in self.subspaces.items()}}

    def save(self, path: str | os.PathLike) -> None:
        """Writes one safetensors file (atomically: a partial write never replaces a good file)."""
        from safetensors.torch import save_file

        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        tensors = {n: v.contiguous() for n, v in self.subspaces.items()}
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(self._file_metadata(), sort_keys=True)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> InputSubspaces:
        """Reads a file written by ``save``; with ``model``, also checks every name and width against it.

        Raises:
            FileNotFoundError: no such file.
            InputSubspacesError: not a readable safetensors file, no or corrupt orthoreg metadata, another format
                version, tensors that disagree with the metadata or are not orthonormal, or (with ``model``) a
                module the model does not have.
        """
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no input-subspaces file at {path!r}; create one with `extract_input_subspaces(...).save(path)`"
            )
        try:
            with safe_open(path, framework="pt") as handle:
                raw = (handle.metadata() or {}).get(_META_KEY)
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise InputSubspacesError(f"{path!r} is not a readable safetensors file ({err}); re-create it") from err
        if raw is None:
            raise InputSubspacesError(
                f"{path!r} is a safetensors file without orthoreg input-subspace metadata (a directions file? use "
                "HarmfulDirections.load)"
            )
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as err:
            raise InputSubspacesError(f"{path!r} has corrupt orthoreg metadata: {err}") from err
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise InputSubspacesError(
                f"{path!r} has input-subspace format {version!r}; this orthoreg reads {FORMAT_VERSION}"
            )
        listed = meta.get("modules")
        if not isinstance(listed, dict) or sorted(listed) != sorted(tensors):
            raise InputSubspacesError(
                f"{path!r}: tensors for {sorted(tensors)[:4]}… but the metadata lists "
                f"{sorted(listed)[:4] if isinstance(listed, dict) else listed!r}…; the file is corrupt"
            )
        for name, v in tensors.items():
            shape = list(v.shape)
            if v.dim() != 2 or shape != list(listed[name]) or not torch.allclose(
                v.double() @ v.double().T, torch.eye(v.shape[0], dtype=torch.float64), atol=_ORTHONORMAL_TOL
            ):
                raise InputSubspacesError(
                    f"{path!r}: the subspace of {name!r} (shape {shape}, listed {listed[name]}) is not a set of "
                    "orthonormal rows; the file is corrupt"
                )
        for key in ("format_version", "k", "modules"):
            meta.pop(key, None)
        result = cls(tensors, metadata=meta)
        if model is not None:
            result.resolve(model)
        return result

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Writes ``folder/input_subspaces.safetensors`` and a readable card ``folder/input_subspaces.json``
        (provenance and, per module, k and d_in; informational, the safetensors file is authoritative)."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        self.save(os.path.join(folder, SUBSPACES_NAME))
        card = {"file": SUBSPACES_NAME, **self._file_metadata()}
        card["modules"] = {n: {"k": int(v.shape[0]), "in_features": int(v.shape[1])}
                           for n, v in self.subspaces.items()}
        path = os.path.join(folder, CARD_NAME)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as handle:
            json.dump(card, handle, indent=2, sort_keys=True)
        os.replace(tmp, path)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, model: nn.Module | None = None) -> InputSubspaces:
        """Reads a folder written by ``save_pretrained`` (see ``load`` for the checks)."""
        folder = os.fspath(folder)
        path = os.path.join(folder, SUBSPACES_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no {SUBSPACES_NAME} in {folder!r}; it is not a folder written by InputSubspaces.save_pretrained"
            )
        return cls.load(path, model=model)
