"""Named orthonormal bases: the one container under ``HarmfulDirections`` (per decoder layer, U_ℓ of the residual
stream) and ``InputSubspaces`` (per linear module, V_m of its inputs), with their file and folder formats.

Both hold, per name, a (k × width) float32 matrix with orthonormal rows, orthonormalised by QR on construction,
plus a JSON-able provenance dict. What they share lives here:

- **one file**: safetensors, one tensor per name, the metadata as a JSON object under the format's key (its
  ``format_version`` checked on read). Written atomically (a partial write never replaces a good file); no pickle is
  ever read.
- **a folder** (``save_pretrained``/``from_pretrained``/``push_to_hub``, like a model's): that file plus a readable
  JSON card. The safetensors file is authoritative; a card that disagrees with it is refused. ``from_pretrained``
  also takes one ``.safetensors`` file or a Hub repo id (``orthoreg.core.hub``).

A subclass says what a name is and how its metadata is checked: ``tensors``, ``file_metadata``, ``from_file`` and
``check_model``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .hub import check_card, push_folder, resolve_files, write_folder

__all__ = ["BasesError", "BasesFormat", "OrthonormalBases", "check_output_file", "is_orthonormal", "orthonormalize"]

_ALREADY_ORTHONORMAL_TOL = 1e-6
_RANK_TOL = 1e-6
ORTHONORMAL_TOL = 1e-4  # how far a stored basis may be from orthonormal before its file is called corrupt


class BasesError(ValueError):
    """A set of orthonormal bases, or its file, is unusable (bad tensor, corrupt file, another model)."""


def orthonormalize(u: torch.Tensor, name: str = "directions", error: type[Exception] = BasesError) -> torch.Tensor:
    """Orthonormal rows spanning the rows of ``u`` (k, d), by QR in float64, keeping each row's orientation
    (the i-th output row has a positive inner product with the i-th input row's component outside rows < i).

    Raises:
        error: ``u`` is not 2-D, not finite, has k > d, or is rank-deficient.
    """
    if u.dim() != 2:
        raise error(f"{name} must be a (k, d) matrix; got shape {tuple(u.shape)}")
    k, d = u.shape
    if k == 0 or k > d:
        raise error(f"{name} has k={k} directions for hidden size {d}; need 1 <= k <= d")
    if not torch.isfinite(u).all():
        raise error(f"{name} contains NaN or Inf")
    u64 = u.detach().to(torch.float64)
    if (u64 @ u64.T - torch.eye(k, dtype=torch.float64, device=u64.device)).abs().max() < _ALREADY_ORTHONORMAL_TOL:
        # Keep already-orthonormal rows bit-for-bit, so a save → load round trip is exact.
        return u.detach().to(torch.float32).contiguous()
    q, r = torch.linalg.qr(u64.T)  # q: (d, k)
    diag = torch.diagonal(r)
    scale = diag.abs().max()
    if scale == 0 or (diag.abs() / scale).min() < _RANK_TOL:
        raise error(
            f"{name} is rank-deficient (its {k} directions span fewer than {k} dimensions); use a smaller k or "
            "more varied contrast prompts"
        )
    q = q * torch.sign(diag)
    return q.T.contiguous().to(torch.float32)


def is_orthonormal(u: torch.Tensor) -> bool:
    """(k, d) rows orthonormal within ``ORTHONORMAL_TOL`` (float64 check)."""
    return u.dim() == 2 and torch.allclose(
        u.double() @ u.double().T, torch.eye(u.shape[0], dtype=torch.float64), atol=ORTHONORMAL_TOL
    )


def check_output_file(path: str | os.PathLike) -> None:
    """Refuses, before anything is computed, an output file that cannot be written: its folder is missing or not
    writable, or the path is a folder.

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


@dataclass(frozen=True)
class BasesFormat:
    """How one kind of bases is stored.

    Attributes:
        kind: what the files are called in messages (``"directions"``, ``"input-subspaces"``).
        metadata_key: the safetensors metadata key holding the JSON metadata.
        version: the ``format_version`` this orthoreg writes and reads.
        weights_name / card_name: the two files of the folder form.
        structural_keys: card keys that must be present (they decide how the tensors are read).
        create_hint: how a user makes such a file, for "not found" messages.
        tags: Hub model-card tags.
    """

    kind: str
    metadata_key: str
    version: int
    weights_name: str
    card_name: str
    structural_keys: tuple[str, ...]
    create_hint: str
    tags: tuple[str, ...]


class OrthonormalBases:
    """Named (k × width) orthonormal bases and their provenance; the file, folder and Hub forms.

    Subclasses set ``FORMAT`` and ``error`` and implement ``bases`` (name → tensor), ``tensors`` (safetensors key →
    tensor), ``file_metadata``, ``from_file`` and ``check_model``.
    """

    FORMAT: ClassVar[BasesFormat]
    error: ClassVar[type[BasesError]] = BasesError
    metadata: dict[str, Any]

    # -------------------------------------------------------------------------------- what a subclass defines
    @property
    def bases(self) -> dict[Any, torch.Tensor]:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """The safetensors tensors of the file form."""
        raise NotImplementedError

    def file_metadata(self) -> dict[str, Any]:
        """The JSON object stored under ``FORMAT.metadata_key`` (provenance plus the structural keys)."""
        raise NotImplementedError

    @classmethod
    def from_file(cls, path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> OrthonormalBases:
        """Builds the object from a file's tensors and metadata (format version already checked), refusing tensors
        that disagree with the metadata."""
        raise NotImplementedError

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuses to be applied to a model these bases do not fit."""
        raise NotImplementedError

    # -------------------------------------------------------------------------------- the container
    @property
    def k(self) -> int:
        return max(u.shape[0] for u in self.bases.values())

    def __iter__(self) -> Iterator[Any]:
        return iter(self.bases)

    def __len__(self) -> int:
        return len(self.bases)

    def items(self):
        return self.bases.items()

    def card(self) -> dict[str, Any]:
        """The folder's readable JSON card: the file metadata (a JSON round trip) and the writing version."""
        from .. import __version__

        return {**json.loads(json.dumps(self.file_metadata())), "orthoreg_version": __version__}

    def model_card(self, repo_id: str) -> str:
        """The README of a Hub repo created by ``push_to_hub``."""
        source = self.metadata.get("source_model")
        return "\n".join([
            "---", "library_name: orthoreg", "tags:", *[f"- {tag}" for tag in self.FORMAT.tags], "---", "",
            f"# {type(self).__name__} for {source or 'a causal LM'}", "", "```python",
            f"from orthoreg import {type(self).__name__}", "",
            f"bases = {type(self).__name__}.from_pretrained({repo_id!r}, model=model)", "```", "",
            f"`{self.FORMAT.card_name}` holds the metadata; `{self.FORMAT.weights_name}` the tensors (safetensors, "
            "no pickle).", "",
        ])

    # -------------------------------------------------------------------------------- one file
    def save(self, path: str | os.PathLike) -> None:
        """Writes the safetensors file (atomically: a partial write never replaces a good file).

        Raises:
            FileNotFoundError: the folder the file goes into does not exist.
            IsADirectoryError: ``path`` is a folder (use ``save_pretrained`` for the folder form).
        """
        from safetensors.torch import save_file

        path = os.fspath(path)
        check_output_file(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        tensors = {key: u.contiguous() for key, u in self.tensors().items()}
        save_file(tensors, tmp, metadata={self.FORMAT.metadata_key: json.dumps(self.file_metadata(), sort_keys=True)})
        os.replace(tmp, path)

    @classmethod
    def read_file(cls, path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, metadata) of a file written by ``save``, its format version checked.

        Raises:
            FileNotFoundError / IsADirectoryError: nothing, or a folder, at ``path``.
            BasesError (``cls.error``): not a readable safetensors file, no or corrupt orthoreg metadata, or another
                format version.
        """
        from safetensors import SafetensorError, safe_open

        path, fmt = os.fspath(path), cls.FORMAT
        if os.path.isdir(path):
            raise IsADirectoryError(
                f"{path!r} is a folder; load the folder form with `{cls.__name__}.from_pretrained({path!r})`"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {fmt.kind} file at {path!r}; create one with {fmt.create_hint}")
        try:
            with safe_open(path, framework="pt") as handle:
                raw = (handle.metadata() or {}).get(fmt.metadata_key)
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise cls.error(f"{path!r} is not a readable safetensors file ({err}); re-create it") from err
        if raw is None:
            raise cls.error(f"{path!r} is a safetensors file without orthoreg {fmt.kind} metadata (key "
                            f"{fmt.metadata_key!r}); is it another kind of orthoreg file?")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as err:
            raise cls.error(f"{path!r} has corrupt orthoreg metadata: {err}") from err
        if not isinstance(meta, dict):
            raise cls.error(f"{path!r} has corrupt orthoreg metadata: expected a JSON object")
        if meta.get("format_version") != fmt.version:
            raise cls.error(f"{path!r} has {fmt.kind} format {meta.get('format_version')!r}; this orthoreg reads "
                            f"{fmt.version}")
        return tensors, meta

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None):
        """Reads a file written by ``save``, orthonormalising each basis and, when ``model`` is given, checking that
        the bases fit it.

        Raises:
            FileNotFoundError: the file does not exist.
            BasesError (``cls.error``): the file is corrupt, of another kind or version, or from another model.
        """
        tensors, meta = cls.read_file(path)
        result = cls.from_file(os.fspath(path), tensors, meta)
        if model is not None:
            result.check_model(model)
        return result

    # -------------------------------------------------------------------------------- folder and Hub
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Writes the folder form (the safetensors file and its JSON card), creating the folder like
        ``PreTrainedModel.save_pretrained``; reload it with ``from_pretrained``.

        Raises:
            NotADirectoryError: ``save_directory`` exists and is a file.
        """
        write_folder(self, save_directory)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike,
        *,
        model: torch.nn.Module | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        subfolder: str | None = None,
        force_download: bool = False,
    ):
        """Loads from a folder written by ``save_pretrained``, a Hub repo id, or one ``.safetensors`` file, with
        every check of ``load`` (no pickle; shapes, finiteness and orthonormality validated).

        Args:
            pretrained (`str`): a local folder, a local ``.safetensors`` file, or a Hub model repo id
                (``"org/name"``) holding the folder form.
            model (`nn.Module`, *optional*): when given, the bases are checked against it.
            revision (`str`, *optional*): branch, tag or commit of the Hub repo.
            cache_dir (`str`, *optional*): Hub cache folder (default: huggingface_hub's).
            token (`str | bool`, *optional*): Hub token, for private or gated repos.
            local_files_only (`bool`, *optional*, defaults to `False`): use only the Hub cache. Implied when
                ``HF_HUB_OFFLINE=1``.
            subfolder (`str`, *optional*): the folder inside the repo (or local folder) that holds the files.
            force_download (`bool`, *optional*, defaults to `False`): fetch again even when cached.

        Raises:
            FileNotFoundError: no such folder, file or repo, a folder without the safetensors file, or (offline) a
                repo that is not in the cache — each naming the path and the fix.
            BasesError (``cls.error``): the files are corrupt, disagree with each other, or come from another model.
        """
        weights, card = resolve_files(
            cls, os.fspath(pretrained), revision=revision, cache_dir=cache_dir, token=token,
            local_files_only=local_files_only, subfolder=subfolder, force_download=force_download,
        )
        result = cls.load(weights, model=model)
        if card is not None:
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
        return push_folder(self, repo_id, commit_message=commit_message, private=private, token=token,
                           revision=revision, create_pr=create_pr)
