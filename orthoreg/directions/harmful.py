"""``HarmfulDirections``: per-layer orthonormal harmful subspaces, their metadata, and a safetensors file format.

File format (``format_version`` 1): one safetensors file; tensor ``layer.<i>`` is U_i of shape (k, d) in float32;
the safetensors metadata key ``"orthoreg"`` holds a JSON object with ``format_version``, ``hidden_size``,
``num_layers``, ``model_type``, ``source_model``, ``source_revision``, ``k``, ``method``, ``pooling``,
``prompt_hash`` and ``separation`` (per layer). No pickle is ever read.

Folder format (``save_pretrained``/``from_pretrained``/``push_to_hub``, like a model's): a folder (or Hub repo)
holding that file as ``directions.safetensors`` and ``directions_config.json``, the same metadata as indented JSON
for people and Hub pages. The safetensors file is authoritative; the card must agree with it (layers, k, hidden
size, format version), so a hand-edited or mixed-up folder is refused rather than half-read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..core.bases import BasesError, BasesFormat, OrthonormalBases, is_orthonormal, orthonormalize

__all__ = ["CARD_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "DirectionsError", "DirectionsOnDevice", "HarmfulDirections"]

FORMAT_VERSION = 1
WEIGHTS_NAME = "directions.safetensors"
CARD_NAME = "directions_config.json"


class DirectionsError(BasesError):
    """A directions file or tensor is unusable (wrong shape, degenerate, corrupt, or from another model)."""


@dataclass
class HarmfulDirections(OrthonormalBases):
    """Harmful subspaces per decoder layer, orthonormalised on construction.

    Args:
        directions (`Mapping[int, torch.Tensor]`): layer index → U (k, d). Rows are orthonormalised by QR.
        hidden_size (`int`, *optional*): d; inferred from the tensors when omitted.
        metadata (`dict`, *optional*): provenance (``source_model``, ``method``, ``pooling``, ``separation``, …).

    Example:
        >>> dirs = HarmfulDirections({10: torch.randn(1, 576)}, metadata={"source_model": "my-model"})
        >>> dirs.save_pretrained("harmful-directions")          # a folder, like model.save_pretrained
        >>> dirs = HarmfulDirections.from_pretrained("harmful-directions", model=model)
        >>> dirs.push_to_hub("my-org/my-model-harmful-directions")  # then from_pretrained("my-org/…") anywhere
        >>> dirs.save("harmful.safetensors")                       # or one file
        >>> dirs = HarmfulDirections.load("harmful.safetensors", model=model)
    """

    directions: dict[int, torch.Tensor]
    hidden_size: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    FORMAT: ClassVar[BasesFormat] = BasesFormat(
        kind="directions", metadata_key="orthoreg", version=FORMAT_VERSION, weights_name=WEIGHTS_NAME,
        card_name=CARD_NAME, structural_keys=("format_version", "hidden_size", "layers", "k"),
        create_hint="`orthoreg directions extract --out PATH` or `HarmfulDirections.save_pretrained(PATH)`",
        tags=("orthoreg", "harmful-directions"),
    )
    error: ClassVar[type[BasesError]] = DirectionsError

    def __post_init__(self) -> None:
        if not isinstance(self.directions, Mapping) or not self.directions:
            raise DirectionsError("HarmfulDirections needs at least one layer: {layer_index: (k, d) tensor}")
        cleaned: dict[int, torch.Tensor] = {}
        for layer, u in self.directions.items():
            if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
                raise DirectionsError(f"layer keys must be non-negative ints; got {layer!r}")
            u = torch.as_tensor(u)
            if u.dim() == 1:
                u = u.unsqueeze(0)
            cleaned[layer] = orthonormalize(u, name=f"directions of layer {layer}", error=DirectionsError)
        widths = {u.shape[1] for u in cleaned.values()}
        if len(widths) != 1:
            raise DirectionsError(f"directions of different layers have different widths {sorted(widths)}")
        width = widths.pop()
        if self.hidden_size is not None and self.hidden_size != width:
            raise DirectionsError(f"hidden_size={self.hidden_size} but the direction tensors are {width} wide")
        self.hidden_size = width
        self.directions = dict(sorted(cleaned.items()))
        self.metadata = dict(self.metadata)

    @property
    def bases(self) -> dict[int, torch.Tensor]:
        return self.directions

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.directions[layer]

    def __contains__(self, layer: object) -> bool:
        return layer in self.directions

    def check_compatible(self, hidden_size: int, num_layers: int, model_type: str | None = None) -> None:
        """Refuses to be applied to a model of another width, depth or family.

        Raises:
            DirectionsError: naming the mismatch and the fix.
        """
        if hidden_size != self.hidden_size:
            raise DirectionsError(
                f"these harmful directions are {self.hidden_size}-dimensional but the model's hidden size is "
                f"{hidden_size}; extract directions from this model (`orthoreg directions extract`)"
            )
        too_deep = [layer for layer in self.directions if layer >= num_layers]
        if too_deep:
            raise DirectionsError(
                f"directions exist for layers {too_deep} but the model has only {num_layers} decoder layers; "
                "they come from a different model"
            )
        source_layers = self.metadata.get("num_layers")
        source_type = self.metadata.get("model_type")
        if source_layers is not None and int(source_layers) != num_layers:
            raise DirectionsError(
                f"directions were extracted from a model with {source_layers} layers; this model has {num_layers}. "
                "Extract directions from this model."
            )
        if source_type and model_type and source_type != model_type:
            raise DirectionsError(
                f"directions were extracted from a {source_type!r} model; this model is {model_type!r}. "
                "Extract directions from this model."
            )

    # ---------------------------------------------------------------------------------------- file format
    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"layer.{layer}": u for layer, u in self.directions.items()}

    def file_metadata(self) -> dict[str, Any]:
        return {**self.metadata, "format_version": FORMAT_VERSION, "hidden_size": self.hidden_size,
                "layers": self.layers, "k": self.k}

    @classmethod
    def from_file(cls, path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> HarmfulDirections:
        hidden, listed = meta.get("hidden_size"), meta.get("layers")
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1 or not isinstance(listed, list):
            raise DirectionsError(
                f"{path!r} has corrupt orthoreg metadata: needs an int `hidden_size` and a `layers` list "
                f"(got {hidden!r}, {listed!r}); re-create the file"
            )
        directions = {}
        for key, tensor in tensors.items():
            if not key.startswith("layer.") or not key[6:].isdigit():
                raise DirectionsError(f"{path!r} has an unexpected tensor {key!r}")
            directions[int(key[6:])] = tensor
        if sorted(directions) != sorted(listed):
            raise DirectionsError(f"{path!r}: tensors for layers {sorted(directions)} but metadata says {listed}")
        for layer, u in directions.items():
            # Shape first: a tensor of the wrong rank would make the Gram product itself fail.
            if u.dim() != 2 or u.shape[1] != hidden or not is_orthonormal(u):
                raise DirectionsError(
                    f"{path!r}: layer {layer} directions of shape {tuple(u.shape)} are not orthonormal (k, "
                    f"{hidden}) rows; the file is corrupt"
                )
        meta = {key: value for key, value in meta.items() if key not in ("format_version", "hidden_size", "layers", "k")}
        return cls(directions, hidden_size=hidden, metadata=meta)

    def check_model(self, model: torch.nn.Module) -> None:
        from ..core.capture import find_decoder_stack

        stack = find_decoder_stack(model)
        self.check_compatible(stack.hidden_size, stack.num_layers, stack.model_type)

    def model_card(self, repo_id: str) -> str:
        from ..core.hub import looks_like_repo_id

        meta = self.metadata
        source = meta.get("source_model")
        front = ["---", "library_name: orthoreg", "tags:", *[f"- {tag}" for tag in self.FORMAT.tags]]
        if isinstance(source, str) and looks_like_repo_id(source):
            front.append(f"base_model: {source}")
        front.append("---")
        separation = meta.get("separation") or {}
        rows = [f"| {layer} | {separation.get(str(layer), {}).get('accuracy', '-')} |" for layer in self.layers]
        return "\n".join([
            *front, "", f"# Harmful directions for {source or 'a causal LM'}", "",
            f"orthoreg `HarmfulDirections`: k = {self.k} direction(s) per layer at layers {self.layers} "
            f"(hidden size {self.hidden_size}), method `{meta.get('method')}`, pooling `{meta.get('pooling')}`.",
            "", "```python", "from orthoreg import HarmfulDirections", "",
            f"directions = HarmfulDirections.from_pretrained({repo_id!r}, model=model)", "```", "",
            "| layer | held-out separation accuracy |", "| --- | --- |", *rows, "",
            f"`{CARD_NAME}` holds the full metadata; `{WEIGHTS_NAME}` the tensors (safetensors, no pickle).", "",
        ])


class DirectionsOnDevice:
    """U_ℓ as float32 on a device, cached per (layer, device): the hooks read one layer's directions per forward
    without a copy each time, and whatever the training dtype the penalties are computed in float32."""

    def __init__(self, directions: HarmfulDirections):
        self.directions = directions
        self._cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, layer: int, device: torch.device) -> torch.Tensor:
        key = (layer, device)
        if key not in self._cache:
            self._cache[key] = self.directions[layer].to(device=device, dtype=torch.float32)
        return self._cache[key]
