"""HarmfulDirections' folder form: save_pretrained / from_pretrained (local folder and a mocked Hub) / push_to_hub.

No network: the Hub is replaced by monkeypatched ``huggingface_hub.hf_hub_download`` / ``HfApi`` that serve from and
record into a local "remote" folder; one test runs the real ``hf_hub_download`` offline against an empty cache.
"""

import json
import os
import shutil
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

from orthoreg.core.hub import README_NAME
from orthoreg.directions.harmful import CARD_NAME, WEIGHTS_NAME, DirectionsError, HarmfulDirections
from tests._directions_helpers import one_torch_thread, planted_model  # noqa: F401 - autouse fixture

META = {"source_model": "org/tiny-llama", "model_type": "llama", "num_layers": 3, "method": "pca_diff",
        "pooling": "last", "separation": {"0": {"accuracy": 0.9}, "2": {"accuracy": 1.0}}}


def _directions(seed=0):
    g = torch.Generator().manual_seed(seed)
    return HarmfulDirections({i: torch.randn(2, 32, generator=g) for i in (0, 2)}, metadata=META)


def _assert_same(a, b):
    assert a.layers == b.layers and a.hidden_size == b.hidden_size and a.metadata == b.metadata
    assert all(torch.equal(a[i], b[i]) for i in a.layers)


# ----------------------------------------------------------------------------------------------- local folder


def test_save_pretrained_writes_safetensors_and_a_readable_card(tmp_path):
    dirs = _directions()
    folder = tmp_path / "a" / "b"  # parents are created, as PreTrainedModel.save_pretrained does
    dirs.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == [WEIGHTS_NAME, CARD_NAME]
    card = json.loads((folder / CARD_NAME).read_text())
    assert card["source_model"] == "org/tiny-llama" and card["layers"] == [0, 2] and card["k"] == 2
    assert card["method"] == "pca_diff" and card["format_version"] == 1 and card["hidden_size"] == 32
    assert card["separation"]["2"]["accuracy"] == 1.0 and "orthoreg_version" in card
    assert (folder / CARD_NAME).read_text().startswith("{\n  "), "indented for people"
    _assert_same(HarmfulDirections.from_pretrained(folder), dirs)
    _assert_same(HarmfulDirections.load(folder / WEIGHTS_NAME), dirs)  # the file inside is the single-file format


def test_from_pretrained_checks_the_model_and_takes_a_single_file(tmp_path):
    model, _ = planted_model(1)
    dirs = _directions()
    dirs.save_pretrained(tmp_path / "d")
    HarmfulDirections.from_pretrained(tmp_path / "d", model=model)
    with pytest.raises(DirectionsError, match="hidden size is 48"):
        HarmfulDirections.from_pretrained(tmp_path / "d", model=planted_model(1, hidden_size=48,
                                                                              num_attention_heads=4)[0])
    dirs.save(tmp_path / "one.safetensors")
    _assert_same(HarmfulDirections.from_pretrained(tmp_path / "one.safetensors"), dirs)


def test_folder_validation_is_the_file_loaders(tmp_path):
    folder = tmp_path / "d"
    _directions().save_pretrained(folder)
    raw = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(raw[: len(raw) - 40])
    with pytest.raises(DirectionsError, match="not a readable safetensors file"):
        HarmfulDirections.from_pretrained(folder)


def test_a_card_that_disagrees_with_the_file_is_refused(tmp_path):
    folder = tmp_path / "d"
    _directions().save_pretrained(folder)
    card = json.loads((folder / CARD_NAME).read_text())
    (folder / CARD_NAME).write_text(json.dumps({**card, "layers": [0, 1], "source_model": "other"}))
    with pytest.raises(DirectionsError, match=r"layers: card \[0, 1\] vs file \[0, 2\].*source_model.*save_pretrained"):
        HarmfulDirections.from_pretrained(folder)
    (folder / CARD_NAME).write_text("{oops")
    with pytest.raises(DirectionsError, match="not valid JSON"):
        HarmfulDirections.from_pretrained(folder)
    (folder / CARD_NAME).write_text(json.dumps({"source_model": "org/tiny-llama"}))
    with pytest.raises(DirectionsError, match=r"missing \['format_version', 'hidden_size', 'layers', 'k'\]"):
        HarmfulDirections.from_pretrained(folder)
    (folder / CARD_NAME).unlink()  # the card is for people: the safetensors file alone still loads
    assert HarmfulDirections.from_pretrained(folder).layers == [0, 2]


def test_missing_paths_and_empty_folders_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no directions file or folder at '.*nope'.*save_pretrained"):
        HarmfulDirections.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no directions file or folder at 'missing.safetensors'"):
        HarmfulDirections.from_pretrained("missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=rf"'{tmp_path}/empty' holds no {WEIGHTS_NAME}; it is empty.*"
                                                r"save_pretrained\(PATH\)"):
        HarmfulDirections.from_pretrained(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    _directions().save(tmp_path / "other" / "h.safetensors")
    with pytest.raises(FileNotFoundError, match=r"it holds 'h.safetensors': load that file"):
        HarmfulDirections.from_pretrained(tmp_path / "other")
    with pytest.raises(IsADirectoryError, match="from_pretrained"):
        HarmfulDirections.load(tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        _directions().save_pretrained(tmp_path / "file")


def test_save_refuses_a_missing_folder_before_writing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"folder '.*missing' does not exist; create it first"):
        _directions().save(tmp_path / "missing" / "x.safetensors")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        _directions().save(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- mocked Hub


@pytest.fixture
def online(monkeypatch):
    """The tests run with HF_HUB_OFFLINE=1 (conftest); these switch it off so the (mocked) Hub is asked."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A Hub of one repo per revision, served from ``tmp_path/remote/<repo>/<revision>``; records every call."""
    remote = tmp_path / "remote"
    calls = []

    def hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        base = remote / repo_id / (kwargs.get("revision") or "main")
        if not (remote / repo_id).is_dir():
            raise RepositoryNotFoundError("404", response=SimpleNamespace(headers={}, request=None))
        source = base / (kwargs.get("subfolder") or "") / filename
        if not source.is_file():
            raise EntryNotFoundError(f"{filename} not found")
        target = tmp_path / "cache" / repo_id / (kwargs.get("revision") or "main") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return remote, calls


def test_from_pretrained_downloads_with_revision_and_options(tmp_path, online, fake_hub):
    remote, calls = fake_hub
    _directions(seed=0).save_pretrained(remote / "org" / "dirs" / "main")
    _directions(seed=1).save_pretrained(remote / "org" / "dirs" / "v2")
    got = HarmfulDirections.from_pretrained("org/dirs", revision="v2", cache_dir=str(tmp_path / "hf"), token="tok")
    _assert_same(got, _directions(seed=1))  # the v2 revision, not main
    assert [(repo, name) for repo, name, _ in calls] == [("org/dirs", WEIGHTS_NAME), ("org/dirs", CARD_NAME)]
    for _, _, kwargs in calls:
        assert kwargs["revision"] == "v2" and kwargs["cache_dir"] == str(tmp_path / "hf") and kwargs["token"] == "tok"
        assert kwargs["local_files_only"] is False and kwargs["library_name"] == "orthoreg"
    _assert_same(HarmfulDirections.from_pretrained("org/dirs"), _directions(seed=0))
    assert calls[-1][2]["revision"] is None


def test_hub_card_is_checked_and_optional(online, fake_hub):
    remote, _ = fake_hub
    folder = remote / "org" / "dirs" / "main"
    _directions().save_pretrained(folder)
    card = json.loads((folder / CARD_NAME).read_text())
    (folder / CARD_NAME).write_text(json.dumps({**card, "k": 3}))
    with pytest.raises(DirectionsError, match="k: card 3 vs file 2"):
        HarmfulDirections.from_pretrained("org/dirs")
    (folder / CARD_NAME).unlink()
    assert HarmfulDirections.from_pretrained("org/dirs").k == 2


@pytest.mark.parametrize(
    "repo, kwargs, match",
    [
        ("org/absent", {}, "no local folder or file 'org/absent', and no Hub repo of that name"),
        ("org/dirs", {"subfolder": "elsewhere"}, f"holds no {WEIGHTS_NAME}; it was not written by"),
        ("org/dirs", {"local_files_only": True}, "not in the local Hub cache while local_files_only=True forbids"),
    ],
)
def test_hub_failures_are_clear(online, fake_hub, repo, kwargs, match):
    remote, _ = fake_hub
    _directions().save_pretrained(remote / "org" / "dirs" / "main")
    with pytest.raises(FileNotFoundError, match=match):
        HarmfulDirections.from_pretrained(repo, **kwargs)


def test_offline_env_reads_the_cache_only(fake_hub, monkeypatch):
    _, calls = fake_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE=1 forbids downloading it.*hf download org/dirs"):
        HarmfulDirections.from_pretrained("org/dirs")
    assert calls[0][2]["local_files_only"] is True


def test_real_hf_hub_download_offline_with_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the local Hub cache"):
        HarmfulDirections.from_pretrained("some-org/some-directions", cache_dir=str(tmp_path / "empty-cache"))


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path, monkeypatch, fake_hub):
    uploaded, calls = tmp_path / "uploaded", []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/user/{repo_id}")

        def file_exists(self, repo_id, filename, **kwargs):
            calls.append(("file_exists", repo_id, filename))
            return False

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            shutil.copytree(kwargs["folder_path"], uploaded)  # the temporary folder is gone after the call
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    dirs = _directions()
    assert dirs.push_to_hub("dirs", private=True, token="tok", revision="dev", commit_message="first") == "commit-info"
    assert calls[0] == ("init", "tok")
    assert calls[1] == ("create_repo", "dirs", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[2] == ("file_exists", "user/dirs", README_NAME)
    upload = calls[3][1]
    assert upload["repo_id"] == "user/dirs" and upload["revision"] == "dev" and upload["commit_message"] == "first"
    assert upload["create_pr"] is False and upload["repo_type"] == "model"
    assert sorted(os.listdir(uploaded)) == [README_NAME, WEIGHTS_NAME, CARD_NAME]
    readme = (uploaded / README_NAME).read_text()
    assert "library_name: orthoreg" in readme and "base_model: org/tiny-llama" in readme
    assert "HarmfulDirections.from_pretrained('user/dirs', model=model)" in readme
    # What was uploaded is a folder from_pretrained reads back unchanged.
    _assert_same(HarmfulDirections.from_pretrained(uploaded), dirs)


# ----------------------------------------------------------------------------------------------- InputSubspaces
# The reader term's V_m share the container and its folder / Hub form with the directions.


def _subspaces(seed=0):
    from orthoreg.reader import InputSubspaces

    g = torch.Generator().manual_seed(seed)
    return InputSubspaces({"model.layers.0.mlp.up_proj": torch.randn(2, 32, generator=g),
                           "model.layers.1.self_attn.o_proj": torch.randn(3, 32, generator=g)},
                          metadata={"source_model": "org/tiny-llama", "method": "pca"})


def _assert_same_subspaces(a, b):
    assert a.names == b.names and a.metadata == b.metadata and all(torch.equal(a[n], b[n]) for n in a.names)


def test_input_subspaces_push_to_hub_then_download_from_the_hub(tmp_path, online, fake_hub, monkeypatch):
    from orthoreg.reader import InputSubspaces, InputSubspacesError
    from orthoreg.reader.subspaces import CARD_NAME as SUBSPACES_CARD
    from orthoreg.reader.subspaces import SUBSPACES_NAME

    remote, calls = fake_hub
    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def file_exists(self, repo_id, filename, **kwargs):
            return False

        def upload_folder(self, **kwargs):
            uploads.append(kwargs)
            shutil.copytree(kwargs["folder_path"], remote / kwargs["repo_id"] / "main")
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    subspaces = _subspaces()
    assert subspaces.push_to_hub("org/reader") == "commit-info"
    assert sorted(os.listdir(remote / "org" / "reader" / "main")) == [README_NAME, SUBSPACES_CARD, SUBSPACES_NAME]
    assert uploads[0]["commit_message"] == "Upload InputSubspaces (2 bases, k=3) with orthoreg"
    readme = (remote / "org" / "reader" / "main" / README_NAME).read_text()
    assert "InputSubspaces.from_pretrained('org/reader', model=model)" in readme
    got = InputSubspaces.from_pretrained("org/reader")
    _assert_same_subspaces(got, subspaces)
    assert [(repo, name) for repo, name, _ in calls] == [("org/reader", SUBSPACES_NAME), ("org/reader", SUBSPACES_CARD)]
    # The card is checked against the file like a directions card: a hand-edited k is refused.
    card_path = remote / "org" / "reader" / "main" / SUBSPACES_CARD
    card = json.loads(card_path.read_text())
    assert card["modules"]["model.layers.1.self_attn.o_proj"] == {"k": 3, "in_features": 32}
    card_path.write_text(json.dumps({**card, "k": 5}))
    with pytest.raises(InputSubspacesError, match="k: card 5 vs file 3.*InputSubspaces.save_pretrained"):
        InputSubspaces.from_pretrained("org/reader")
    # A directions repo is not an input-subspaces repo.
    _directions().save_pretrained(remote / "org" / "dirs" / "main")
    with pytest.raises(FileNotFoundError, match=f"holds no {SUBSPACES_NAME}; it was not written by "
                                                r"`InputSubspaces.push_to_hub`"):
        InputSubspaces.from_pretrained("org/dirs")
