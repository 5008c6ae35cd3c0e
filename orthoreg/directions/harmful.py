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

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

FORMAT_VERSION = 1
_ORTHONORMAL_TOL = 1e-4
_RANK_TOL = 1e-6
_ALREADY_ORTHONORMAL_TOL = 1e-6


class DirectionsError(ValueError):
    """A directions file or tensor is unusable (wrong shape, degenerate, corrupt, or from another model)."""


def orthonormalize(u: torch.Tensor, name: str = "directions") -> torch.Tensor:
    """Orthonormal rows spanning the rows of ``u`` (k, d), by QR in float64, keeping each row's orientation
    (the i-th output row has a positive inner product with the i-th input row's component outside rows < i).

    Raises:
        DirectionsError: ``u`` is not 2-D, not finite, has k > d, or is rank-deficient.
    """
    if u.dim() != 2:
        raise DirectionsError(f"{name} must be a (k, d) matrix; got shape {tuple(u.shape)}")
    k, d = u.shape
    if k == 0 or k > d:
        raise DirectionsError(f"{name} has k={k} directions for hidden size {d}; need 1 <= k <= d")
    if not torch.isfinite(u).all():
        raise DirectionsError(f"{name} contains NaN or Inf")
    u64 = u.detach().to(torch.float64)
    if (u64 @ u64.T - torch.eye(k, dtype=torch.float64, device=u64.device)).abs().max() < _ALREADY_ORTHONORMAL_TOL:
        # Keep already-orthonormal rows bit-for-bit, so a save → load round trip is exact.
        return u.detach().to(torch.float32).contiguous()
    q, r = torch.linalg.qr(u64.T)  # q: (d, k)
    diag = torch.diagonal(r)
    scale = diag.abs().max()
    if scale == 0 or (diag.abs() / scale).min() < _RANK_TOL:
        raise DirectionsError(
            f"{name} is rank-deficient (its {k} directions span fewer than {k} dimensions); use a smaller k or "
            "more varied contrast prompts"
        )
    q = q * torch.sign(diag)
    return q.T.contiguous().to(torch.float32)


def check_output_file(path: str | os.PathLike) -> None:
    """Refuses, before anything is computed, an output file that cannot be written: its folder is missing or not
    writable, or the path is a folder. Used by :meth:`HarmfulDirections.save` and by the CLI before extraction.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: naming the path and the fix.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder; give a file name (…/harmful.safetensors), or save the folder "
                                "form with `save_pretrained`")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {path!r}: the folder {parent!r} does not exist; create it first "
                                f"(mkdir -p {parent}) or choose another path")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write {path!r}: the folder {parent!r} is not writable")


@dataclass
class HarmfulDirections:
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
            cleaned[layer] = orthonormalize(u, name=f"directions of layer {layer}")
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
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def k(self) -> int:
        return max(u.shape[0] for u in self.directions.values())

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

    def _file_metadata(self) -> dict[str, Any]:
        return {**self.metadata, "format_version": FORMAT_VERSION, "hidden_size": self.hidden_size,
                "layers": self.layers, "k": self.k}

    def save(self, path: str | os.PathLike) -> None:
        """Writes the safetensors file (atomically: a partial write never replaces a good file).

        Raises:
            FileNotFoundError: the folder the file goes into does not exist.
            IsADirectoryError: ``path`` is a folder (use :meth:`save_pretrained` for the folder form).
        """
        from safetensors.torch import save_file

        path = os.fspath(path)
        check_output_file(path)
        tensors = {f"layer.{layer}": u.contiguous() for layer, u in self.directions.items()}
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(tensors, tmp, metadata={"orthoreg": json.dumps(self._file_metadata(), sort_keys=True)})
        os.replace(tmp, path)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Writes the folder form (``directions.safetensors`` + ``directions_config.json``), creating the folder
        like ``PreTrainedModel.save_pretrained``; reload it with :meth:`from_pretrained`.

        Raises:
            NotADirectoryError: ``save_directory`` exists and is a file.
        """
        from ..core.hub import write_folder

        write_folder(self, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_directions: str | os.PathLike,
        *,
        model: torch.nn.Module | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        subfolder: str | None = None,
        force_download: bool = False,
    ) -> HarmfulDirections:
        """Loads directions from a folder written by :meth:`save_pretrained`, a Hub repo id, or one ``.safetensors``
        file, with every check of :meth:`load` (no pickle; shapes, finiteness and orthonormality validated).

        Args:
            pretrained_directions (`str`): a local folder, a local ``.safetensors`` file, or a Hub model repo id
                (``"org/name"``) holding the folder form.
            model (`nn.Module`, *optional*): when given, the directions are checked against its width, depth and
                family.
            revision (`str`, *optional*): branch, tag or commit of the Hub repo.
            cache_dir (`str`, *optional*): Hub cache folder (default: huggingface_hub's).
            token (`str | bool`, *optional*): Hub token, for private or gated repos.
            local_files_only (`bool`, *optional*, defaults to `False`): use only the Hub cache. Implied when
                ``HF_HUB_OFFLINE=1``.
            subfolder (`str`, *optional*): the folder inside the repo (or local folder) that holds the files.
            force_download (`bool`, *optional*, defaults to `False`): fetch again even when cached.

        Raises:
            FileNotFoundError: no such folder, file or repo, a folder without ``directions.safetensors``, or (offline)
                a repo that is not in the cache — each naming the path and the fix.
            DirectionsError: the files are corrupt, disagree with each other, or come from another model.
        """
        from ..core.hub import resolve_files

        weights, card = resolve_files(
            os.fspath(pretrained_directions), revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only, subfolder=subfolder, force_download=force_download,
        )
        result = cls.load(weights, model=model)
        if card is not None:
            from ..core.hub import check_card

            check_card(result, card)
        return result

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Uploads the folder form to a Hub model repo (created if missing), like ``PreTrainedModel.push_to_hub``;
        adds a short README model card when the repo has none. Returns huggingface_hub's ``CommitInfo``."""
        from ..core.hub import push_folder

        return push_folder(self, repo_id, commit_message=commit_message, private=private, token=token,
                           revision=revision, create_pr=create_pr)

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None) -> HarmfulDirections:
        """Reads a directions file, orthonormalising each U and, when ``model`` is given, checking it fits.

        Raises:
            FileNotFoundError: the file does not exist.
            DirectionsError: the file is corrupt, not an orthoreg directions file, or from another model.
        """
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(
                f"{path!r} is a folder; load the folder form with `HarmfulDirections.from_pretrained({path!r})`"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no directions file at {path!r}; create one with `orthoreg directions extract` or "
                "`HarmfulDirections.save`"
            )
        try:
            with safe_open(path, framework="pt") as handle:
                raw_meta = (handle.metadata() or {}).get("orthoreg")
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise DirectionsError(f"{path!r} is not a readable safetensors file ({err}); re-create it") from err
        if raw_meta is None:
            raise DirectionsError(f"{path!r} is a safetensors file but carries no orthoreg metadata")
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError as err:
            raise DirectionsError(f"{path!r} has corrupt orthoreg metadata: {err}") from err
        if not isinstance(meta, dict):
            raise DirectionsError(f"{path!r} has corrupt orthoreg metadata: expected a JSON object")
        if meta.get("format_version") != FORMAT_VERSION:
            raise DirectionsError(
                f"{path!r} has directions format {meta.get('format_version')!r}; this orthoreg reads {FORMAT_VERSION}"
            )
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
        if sorted(directions) != sorted(meta.get("layers", [])):
            raise DirectionsError(f"{path!r}: tensors for layers {sorted(directions)} but metadata says {meta.get('layers')}")
        for layer, u in directions.items():
            # Shape first: a tensor of the wrong rank would make the Gram product itself fail.
            if u.dim() != 2 or u.shape[1] != hidden or not torch.allclose(
                u.double() @ u.double().T, torch.eye(u.shape[0], dtype=torch.float64), atol=_ORTHONORMAL_TOL
            ):
                raise DirectionsError(
                    f"{path!r}: layer {layer} directions of shape {tuple(u.shape)} are not orthonormal (k, "
                    f"{meta.get('hidden_size')}) rows; the file is corrupt"
                )
        hidden_size = meta.pop("hidden_size")
        for key in ("format_version", "layers", "k"):
            meta.pop(key, None)
        result = cls(directions, hidden_size=hidden_size, metadata=meta)
        if model is not None:
            from ..core.capture import find_decoder_stack

            stack = find_decoder_stack(model)
            result.check_compatible(stack.hidden_size, stack.num_layers, stack.model_type)
        return result


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
