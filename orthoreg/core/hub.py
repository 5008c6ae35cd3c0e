"""The folder form of orthoreg's orthonormal bases (``HarmfulDirections``, ``InputSubspaces``) and its Hub
transport: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``, with the layout and conventions of a
``PreTrainedModel``.

A folder (local, or a Hub model repo) holds

- the safetensors file (``directions.safetensors``, ``input_subspaces.safetensors``): the tensors and their metadata,
  exactly the single-file format of ``save`` — the authoritative copy, read with every check of ``load``;
- a JSON card (``directions_config.json``, ``input_subspaces.json``): the same metadata as indented JSON for people and
  Hub pages. It must agree with the safetensors metadata on every key both carry; a folder whose card disagrees was
  edited by hand or mixed from two saves, and is refused.

Hub downloads go through ``huggingface_hub.hf_hub_download`` (cached in the Hub cache, ``revision``/``token``/
``cache_dir`` passed through). ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` reads the cache only, and a repo
that is not cached then fails with the fix, not with a network error.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Protocol


class FolderForm(Protocol):
    """What the folder and Hub functions need of a set of bases (``orthoreg.core.bases.FolderForm`` has it)."""

    FORMAT: Any  # a ``BasesFormat``: file names, metadata key, kind, hints
    error: type[Exception]
    k: int

    def save(self, path: str) -> None: ...

    def card(self) -> dict[str, Any]: ...

    def model_card(self, repo_id: str) -> str: ...

    def __len__(self) -> int: ...

README_NAME = "README.md"
# Card keys that are not the file's: which orthoreg wrote the card.
_WRITER_KEYS = ("orthoreg_version",)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def write_json(path: str, payload: Any) -> None:
    """Indented, key-sorted JSON, written atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


def write_folder(bases: FolderForm, save_directory: str | os.PathLike) -> str:
    """Writes the safetensors file and the JSON card of ``bases`` into ``save_directory`` (created with its
    parents); each file is written atomically. Returns the folder."""
    folder = os.fspath(save_directory)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder!r} is a file; save_pretrained writes a folder (give a folder path, or use "
                                 "`save` for a single .safetensors file)")
    os.makedirs(folder, exist_ok=True)
    bases.save(os.path.join(folder, bases.FORMAT.weights_name))
    write_json(os.path.join(folder, bases.FORMAT.card_name), bases.card())
    return folder


def check_card(bases: FolderForm, card_path: str) -> None:
    """Refuses a card that is not a JSON object, lacks a structural key, or disagrees with the safetensors file it
    describes.

    Raises:
        BasesError (the container's error class): naming the disagreeing keys and the fix.
    """
    error, resave = bases.error, f"`{type(bases).__name__}.save_pretrained`"
    try:
        with open(card_path, encoding="utf-8") as fh:
            card = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{card_path!r} is not valid JSON ({err}); re-save the folder with save_pretrained") from err
    if not isinstance(card, dict):
        raise error(f"{card_path!r} must hold a JSON object; re-save the folder with save_pretrained")
    expected = {key: value for key, value in bases.card().items() if key not in _WRITER_KEYS}
    missing = [key for key in bases.FORMAT.structural_keys if key not in card]
    differing = sorted(key for key in expected if key in card and card[key] != expected[key])
    if missing or differing:
        details = "; ".join(
            [f"missing {missing}"] * bool(missing)
            + [f"{key}: card {card[key]!r} vs file {expected[key]!r}" for key in differing]
        )
        raise error(
            f"{card_path!r} does not describe the {bases.FORMAT.weights_name} next to it ({details}); the folder was "
            f"edited by hand or mixed from two saves. Re-save it with {resave}"
        )


def looks_like_repo_id(source: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if source.startswith((".", "/", "~")) or source.count("/") > 1 or (os.sep != "/" and os.sep in source):
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _local_files(cls: type[FolderForm], folder: str) -> tuple[str, str | None]:
    fmt = cls.FORMAT
    weights = os.path.join(folder, fmt.weights_name)
    if not os.path.isfile(weights):
        held = sorted(os.listdir(folder))
        single = [name for name in held if name.endswith(".safetensors")]
        hint = (f"; it holds {single[0]!r}: load that file with `{cls.__name__}.load`" if len(single) == 1 else
                f"; it holds {held[:8]}" if held else "; it is empty")
        raise FileNotFoundError(
            f"the folder {folder!r} holds no {fmt.weights_name}{hint}. Write one with {fmt.create_hint}"
        )
    card = os.path.join(folder, fmt.card_name)
    return weights, card if os.path.isfile(card) else None


def resolve_files(
    cls: type[FolderForm],
    source: str,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    local_files_only: bool,
    subfolder: str | None,
    force_download: bool,
) -> tuple[str, str | None]:
    """(path of the safetensors file, path of the card or ``None``) of ``cls``'s folder form, for a local file, a local
    folder or a Hub repo.

    Raises:
        FileNotFoundError: nothing at ``source`` (locally or on the Hub), a folder without the files, or (offline)
            a repo that is not cached.
        OSError: the Hub could not be reached (with the offline alternative).
    """
    if os.path.isfile(source):
        return source, None
    if os.path.isdir(source):
        folder = os.path.join(source, subfolder) if subfolder else source
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"the folder {source!r} has no subfolder {subfolder!r}")
        return _local_files(cls, folder)
    if source.endswith(".safetensors") or not looks_like_repo_id(source):
        raise FileNotFoundError(
            f"no {cls.FORMAT.kind} file or folder at {source!r} (and it is not a Hub repo id); create it with "
            f"{cls.FORMAT.create_hint}"
        )
    return _download(cls, source, revision=revision, cache_dir=cache_dir, token=token,
                     local_files_only=local_files_only or _hub_offline(), subfolder=subfolder,
                     force_download=force_download)


def _download(cls: type[FolderForm], repo_id: str, *, local_files_only: bool, revision: str | None, **kwargs: Any) -> tuple[str, str | None]:
    import huggingface_hub
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .. import __version__

    fmt = cls.FORMAT
    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    options = dict(revision=revision, local_files_only=local_files_only, library_name="orthoreg",
                   library_version=__version__, **kwargs)
    try:
        # Looked up on the module at call time, so a test's monkeypatch of huggingface_hub.hf_hub_download applies.
        weights = huggingface_hub.hf_hub_download(repo_id, fmt.weights_name, **options)
    except LocalEntryNotFoundError as err:
        why = "HF_HUB_OFFLINE=1" if _hub_offline() else "local_files_only=True"
        raise FileNotFoundError(
            f"no local folder or file {repo_id!r}, and the Hub repo {where} is not in the local Hub cache while "
            f"{why} forbids downloading it. Download it once where the network allows "
            f"(`{cls.__name__}.from_pretrained({repo_id!r})` or `hf download {repo_id}`), or copy its folder "
            "here and pass the folder's path"
        ) from err
    except GatedRepoError as err:
        raise FileNotFoundError(f"the Hub repo {where} is gated; accept its terms on the Hub and pass `token=`") \
            from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"no local folder or file {repo_id!r}, and no Hub repo of that name (or it is private: pass `token=`)"
        ) from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"the Hub repo {repo_id!r} has no revision {revision!r}") from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(
            f"the Hub repo {where} holds no {fmt.weights_name}; it was not written by `{cls.__name__}.push_to_hub`"
        ) from err
    except OSError as err:  # connection errors, HTTP errors, OfflineModeIsEnabled
        raise OSError(
            f"could not download the {fmt.kind} repo {where} ({type(err).__name__}: {err}); with the files already "
            "cached, set HF_HUB_OFFLINE=1, or pass a local folder"
        ) from err
    try:
        card = huggingface_hub.hf_hub_download(repo_id, fmt.card_name, **options)
    except EntryNotFoundError:  # the card is for people; the safetensors file alone is a complete set
        card = None
    return weights, card


def push_folder(
    bases: FolderForm,
    repo_id: str,
    *,
    commit_message: str | None,
    private: bool | None,
    token: str | bool | None,
    revision: str | None,
    create_pr: bool,
) -> Any:
    """Creates the model repo if needed and uploads the folder form (plus a README when the repo has none)."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    api = huggingface_hub.HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo_id  # "name" alone resolves to "<user>/name"
    with tempfile.TemporaryDirectory() as tmp:
        write_folder(bases, tmp)
        try:
            has_readme = api.file_exists(repo_id, README_NAME, revision=revision)
        except HfHubHTTPError:  # e.g. a revision that does not exist yet
            has_readme = False
        if not has_readme:
            with open(os.path.join(tmp, README_NAME), "w", encoding="utf-8") as fh:
                fh.write(bases.model_card(repo_id))
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, repo_type="model", revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload {type(bases).__name__} ({len(bases)} bases, k={bases.k}) "
                                             "with orthoreg",
        )
