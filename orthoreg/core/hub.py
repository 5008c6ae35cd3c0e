"""The folder form of ``HarmfulDirections`` and its Hub transport: ``save_pretrained`` / ``from_pretrained`` /
``push_to_hub``, with the layout and conventions of a ``PreTrainedModel``.

A directions folder (local, or a Hub model repo) holds

- ``directions.safetensors``: the tensors and their metadata, exactly the single-file format of
  ``HarmfulDirections.save`` — the authoritative copy, read with every check of ``HarmfulDirections.load``;
- ``directions_config.json``: the same metadata as indented JSON (source model, layers, k, method, pooling,
  separation, format version), for people and Hub pages. It must agree with the safetensors metadata on every key
  both carry; a folder whose card disagrees was edited by hand or mixed from two saves, and is refused.

Hub downloads go through ``huggingface_hub.hf_hub_download`` (cached in the Hub cache, ``revision``/``token``/
``cache_dir`` passed through). ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` reads the cache only, and a repo
that is not cached then fails with the fix, not with a network error.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..directions.harmful import HarmfulDirections

WEIGHTS_NAME = "directions.safetensors"
CARD_NAME = "directions_config.json"
README_NAME = "README.md"
# The card keys that must be present and equal to the safetensors metadata: they decide how the tensors are read.
_STRUCTURAL_KEYS = ("format_version", "hidden_size", "layers", "k")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _card(directions: HarmfulDirections) -> dict[str, Any]:
    from .. import __version__

    # A JSON round trip of the file's metadata: the card holds exactly what the safetensors header holds.
    return {**json.loads(json.dumps(directions._file_metadata())), "orthoreg_version": __version__}


def write_folder(directions: HarmfulDirections, save_directory: str | os.PathLike) -> str:
    """Writes ``directions.safetensors`` and ``directions_config.json`` into ``save_directory`` (created with its
    parents); each file is written atomically. Returns the folder."""
    folder = os.fspath(save_directory)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder!r} is a file; save_pretrained writes a folder (give a folder path, or use "
                                 "`save` for a single .safetensors file)")
    os.makedirs(folder, exist_ok=True)
    directions.save(os.path.join(folder, WEIGHTS_NAME))
    card_path = os.path.join(folder, CARD_NAME)
    tmp = f"{card_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(_card(directions), fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, card_path)
    return folder


def check_card(directions: HarmfulDirections, card_path: str) -> None:
    """Refuses a card that is not a JSON object or that disagrees with the safetensors metadata it describes.

    Raises:
        DirectionsError: naming the disagreeing keys and the fix.
    """
    from ..directions.harmful import DirectionsError

    try:
        with open(card_path, encoding="utf-8") as fh:
            card = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DirectionsError(f"{card_path!r} is not valid JSON ({err}); re-save the folder with save_pretrained") \
            from err
    if not isinstance(card, dict):
        raise DirectionsError(f"{card_path!r} must hold a JSON object; re-save the folder with save_pretrained")
    file_meta = json.loads(json.dumps(directions._file_metadata()))
    missing = [key for key in _STRUCTURAL_KEYS if key not in card]
    differing = sorted(key for key in file_meta if key in card and card[key] != file_meta[key])
    if missing or differing:
        details = "; ".join(
            [f"missing {missing}"] * bool(missing)
            + [f"{key}: card {card[key]!r} vs file {file_meta[key]!r}" for key in differing]
        )
        raise DirectionsError(
            f"{card_path!r} does not describe the {WEIGHTS_NAME} next to it ({details}); the folder was edited by "
            "hand or mixed from two saves. Re-save it with `HarmfulDirections.save_pretrained`"
        )


def _looks_like_repo_id(source: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if source.startswith((".", "/", "~")) or source.count("/") > 1 or (os.sep != "/" and os.sep in source):
        return False
    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True


def _local_files(folder: str) -> tuple[str, str | None]:
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        held = sorted(os.listdir(folder))
        single = [name for name in held if name.endswith(".safetensors")]
        hint = (f"; it holds {single[0]!r}: load that file with `HarmfulDirections.load`" if len(single) == 1 else
                f"; it holds {held[:8]}" if held else "; it is empty")
        raise FileNotFoundError(
            f"the folder {folder!r} holds no {WEIGHTS_NAME}{hint}. Write a directions folder with "
            "`HarmfulDirections.save_pretrained(folder)` or `orthoreg directions extract --out folder/`"
        )
    card = os.path.join(folder, CARD_NAME)
    return weights, card if os.path.isfile(card) else None


def resolve_files(
    source: str,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
    local_files_only: bool,
    subfolder: str | None,
    force_download: bool,
) -> tuple[str, str | None]:
    """(path of the safetensors file, path of the card or ``None``) for a local file, a local folder or a Hub repo.

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
        return _local_files(folder)
    if source.endswith(".safetensors") or not _looks_like_repo_id(source):
        raise FileNotFoundError(
            f"no directions file or folder at {source!r} (and it is not a Hub repo id); create it with "
            "`orthoreg directions extract --out PATH` or `HarmfulDirections.save_pretrained(PATH)`"
        )
    return _download(source, revision=revision, cache_dir=cache_dir, token=token,
                     local_files_only=local_files_only or _hub_offline(), subfolder=subfolder,
                     force_download=force_download)


def _download(repo_id: str, *, local_files_only: bool, revision: str | None, **kwargs: Any) -> tuple[str, str | None]:
    import huggingface_hub
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .. import __version__

    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    options = dict(revision=revision, local_files_only=local_files_only, library_name="orthoreg",
                   library_version=__version__, **kwargs)
    try:
        # Looked up on the module at call time, so a test's monkeypatch of huggingface_hub.hf_hub_download applies.
        weights = huggingface_hub.hf_hub_download(repo_id, WEIGHTS_NAME, **options)
    except LocalEntryNotFoundError as err:
        why = "HF_HUB_OFFLINE=1" if _hub_offline() else "local_files_only=True"
        raise FileNotFoundError(
            f"no local folder or file {repo_id!r}, and the Hub repo {where} is not in the local Hub cache while "
            f"{why} forbids downloading it. Download it once where the network allows "
            f"(`HarmfulDirections.from_pretrained({repo_id!r})` or `hf download {repo_id}`), or copy its folder "
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
            f"the Hub repo {where} holds no {WEIGHTS_NAME}; it was not written by `HarmfulDirections.push_to_hub`"
        ) from err
    except OSError as err:  # connection errors, HTTP errors, OfflineModeIsEnabled
        raise OSError(
            f"could not download the directions repo {where} ({type(err).__name__}: {err}); with the files already "
            "cached, set HF_HUB_OFFLINE=1, or pass a local folder"
        ) from err
    try:
        card = huggingface_hub.hf_hub_download(repo_id, CARD_NAME, **options)
    except EntryNotFoundError:  # the card is for people; the safetensors file alone is a complete set
        card = None
    return weights, card


def _readme(directions: HarmfulDirections, repo_id: str) -> str:
    meta = directions.metadata
    source = meta.get("source_model")
    front = ["---", "library_name: orthoreg", "tags:", "- orthoreg", "- harmful-directions"]
    if isinstance(source, str) and _looks_like_repo_id(source):
        front.append(f"base_model: {source}")
    front.append("---")
    separation = meta.get("separation") or {}
    rows = [f"| {layer} | {separation.get(str(layer), {}).get('accuracy', '-')} |" for layer in directions.layers]
    return "\n".join([
        *front, "", f"# Harmful directions for {source or 'a causal LM'}", "",
        f"orthoreg `HarmfulDirections`: k = {directions.k} direction(s) per layer at layers {directions.layers} "
        f"(hidden size {directions.hidden_size}), method `{meta.get('method')}`, pooling `{meta.get('pooling')}`.",
        "", "```python", "from orthoreg import HarmfulDirections", "",
        f"directions = HarmfulDirections.from_pretrained({repo_id!r}, model=model)", "```", "",
        "| layer | held-out separation accuracy |", "| --- | --- |", *rows, "",
        f"`{CARD_NAME}` holds the full metadata; `{WEIGHTS_NAME}` the tensors (safetensors, no pickle).", "",
    ])


def push_folder(
    directions: HarmfulDirections,
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
        write_folder(directions, tmp)
        try:
            has_readme = api.file_exists(repo_id, README_NAME, revision=revision)
        except HfHubHTTPError:  # e.g. a revision that does not exist yet
            has_readme = False
        if not has_readme:
            with open(os.path.join(tmp, README_NAME), "w", encoding="utf-8") as fh:
                fh.write(_readme(directions, repo_id))
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, repo_type="model", revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload harmful directions (layers {directions.layers}, "
                                             f"k={directions.k}) with orthoreg",
        )
