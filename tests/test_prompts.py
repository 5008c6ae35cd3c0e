"""Contrast prompt sets: the built-in set's guarantees, file and hub loaders, and every refusal."""

import csv
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from orthoreg.core.prompts import (
    ContrastSet,
    PromptSetError,
    builtin_categories,
    load_builtin,
    load_contrast,
    load_contrast_file,
    load_hub_contrast,
    load_prompt_list,
    prompt_hash,
    validate_contrast,
)

DATA = os.path.join(os.path.dirname(__file__), "..", "orthoreg", "data", "contrast_prompts.jsonl")


def _rows():
    with open(DATA, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ----------------------------------------------------------------------------------------------- built-in set


def test_builtin_file_schema_and_size():
    rows = _rows()
    assert all(set(r) == {"id", "category", "harmful", "harmless", "split"} for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["harmful"] for r in rows}) >= 200, "at least 200 distinct harmful requests"
    assert len({r["category"] for r in rows}) >= 8, "at least 8 harm categories"
    assert {r["split"] for r in rows} == {"train", "test"}
    assert all(r["harmful"] != r["harmless"] for r in rows)


def test_builtin_pairs_share_their_form():
    # Each harmless request keeps the harmful one's request form: same opening words and the same final punctuation.
    for r in _rows():
        assert r["harmful"].split()[:2] == r["harmless"].split()[:2], r["id"]
        assert r["harmful"][-1] == r["harmless"][-1], r["id"]


def test_builtin_test_split_holds_out_whole_activities():
    rows = _rows()
    activity = {r["id"]: r["id"].rsplit("-", 1)[0] for r in rows}  # "<category>-<activity>-<form>"
    train = {activity[r["id"]] for r in rows if r["split"] == "train"}
    test = {activity[r["id"]] for r in rows if r["split"] == "test"}
    assert train and test and not train & test
    per_category = Counter(r["category"] for r in rows if r["split"] == "test")
    assert set(per_category) == {r["category"] for r in rows}, "every category is represented in the test split"


def test_load_builtin_splits_and_categories():
    train, test, everything = load_builtin("train"), load_builtin("test"), load_builtin("all")
    assert len(train.harmful) + len(test.harmful) == len(everything.harmful) == 240
    assert train.paired and len(train.harmful) == len(train.harmless) == len(train.categories)
    assert len(builtin_categories()) == 10
    fraud = load_builtin("all", categories=["fraud"])
    assert set(fraud.categories) == {"fraud"} and len(fraud.harmful) == 24
    with pytest.raises(PromptSetError, match="unknown built-in categories"):
        load_builtin("train", categories=["nope"])
    with pytest.raises(PromptSetError, match="unknown split"):
        load_builtin("validation")


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "harmful, harmless, kwargs, match",
    [
        ([], ["a"], {}, "harmful prompt set is empty"),
        (["a"], [], {}, "harmless prompt set is empty"),
        (["a", "b", "c"], ["x"], {}, "unbalanced contrast set"),
        (["a", "b"], ["x"], {"paired": True}, "equal counts"),
        (["a", "  "], ["x", "y"], {}, "must be non-empty text"),
        (["a", 3], ["x", "y"], {}, "must be non-empty text"),
        ("a single string", ["x"], {}, "not a single string"),
    ],
)
def test_validate_refuses(harmful, harmless, kwargs, match):
    with pytest.raises(PromptSetError, match=match):
        validate_contrast(harmful, harmless, **kwargs)


def test_validate_accepts_mild_imbalance_and_truncates_on_request():
    h, b = validate_contrast(["a", "b", "c", "d", "e"], [" w ", "x", "y", "z"])  # ratio 1.25: accepted
    assert len(h) == 5 and b[0] == "w"
    with pytest.warns(UserWarning, match="keeping the first 2"):
        h, b = validate_contrast(["a", "b", "c", "d"], ["x", "y"], balance="truncate")
    assert h == ["a", "b"] and b == ["x", "y"]


def test_validate_warns_on_prompts_in_both_sets():
    with pytest.warns(UserWarning, match="appear in both sets"):
        validate_contrast(["same", "b"], ["same", "y"])


def test_prompt_hash_is_deterministic_and_order_sensitive():
    assert prompt_hash(["a"], ["b"]) == prompt_hash(["a"], ["b"])
    assert prompt_hash(["a", "c"], ["b", "d"]) != prompt_hash(["c", "a"], ["b", "d"])
    assert prompt_hash(["a"], ["b"]).startswith("sha256:")
    assert ContrastSet(["a"], ["b"]).fingerprint() == prompt_hash(["a"], ["b"])


# ----------------------------------------------------------------------------------------------- files


def test_paired_jsonl_with_split(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"harmful": f"bad {i}", "harmless": f"good {i}", "category": "c", "split": "train" if i < 3 else "test"}
            for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    train = load_contrast_file(path, split="train")
    assert train.harmful == ["bad 0", "bad 1", "bad 2"] and train.paired and train.categories == ["c"] * 3
    assert load_contrast_file(path).harmful == [f"bad {i}" for i in range(4)]  # no split asked: every row
    with pytest.raises(PromptSetError, match="no rows with split='dev'"):
        load_contrast_file(path, split="dev")


def test_labelled_csv(tmp_path):
    path = tmp_path / "labelled.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["goal", "label"])
        writer.writeheader()
        writer.writerows([{"goal": "bad one", "label": "1"}, {"goal": "good one", "label": "harmless"},
                          {"goal": "bad two", "label": "unsafe"}, {"goal": "good two", "label": "0"}])
    contrast = load_contrast(str(path))
    assert contrast.harmful == ["bad one", "bad two"] and contrast.harmless == ["good one", "good two"]
    assert not contrast.paired and contrast.categories is None


def test_json_list_and_prompt_lists(tmp_path):
    (tmp_path / "set.json").write_text(json.dumps([{"harmful": "h", "harmless": "b"}]))
    assert load_contrast_file(tmp_path / "set.json").harmless == ["b"]
    (tmp_path / "h.txt").write_text("first prompt\n\nsecond prompt\n")
    assert load_prompt_list(tmp_path / "h.txt") == ["first prompt", "second prompt"]
    (tmp_path / "h.jsonl").write_text(json.dumps({"instruction": "x"}) + "\n")
    assert load_prompt_list(tmp_path / "h.jsonl") == ["x"]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("bad.jsonl", '{"harmful": "a", "harmless": "b"}\n{not json\n', r"bad.jsonl:2 is not valid JSON"),
        ("layout.jsonl", '{"question": "a"}\n', "expected columns `harmful`/`harmless`"),
        ("label.jsonl", '{"prompt": "a", "label": "maybe"}\n', "has label 'maybe'"),
        ("table.xlsx", "x", r"unsupported file type '.xlsx'; use .jsonl, .json, .csv, .parquet or .txt"),
        ("broken.parquet", "x", "broken.parquet cannot be read as PARQUET"),
        ("empty.csv", "", "holds no rows"),
        ("scalar.json", "3", "expected a list of objects"),
        ("empty.jsonl", "\n", "holds no rows"),
    ],
)
def test_file_refusals(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptSetError, match=match):
        load_contrast_file(path)


PAIRS = [{"harmful": f"bad {i}", "harmless": f"good {i}", "category": "c" if i % 2 else "d"} for i in range(4)]


def _write_all_formats(tmp_path, rows):
    """The same rows as JSONL, JSON (a list, and {"data": [...]}), CSV and Parquet."""
    import datasets

    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    with open(tmp_path / "t.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    return [tmp_path / n for n in ("t.jsonl", "t.json", "wrapped.json", "t.csv", "t.parquet")]


def test_every_format_gives_the_same_contrast_set(tmp_path):
    sets = [load_contrast(str(path)) for path in _write_all_formats(tmp_path, PAIRS)]
    for contrast in sets:
        assert contrast.harmful == [r["harmful"] for r in PAIRS] and contrast.harmless == [r["harmless"] for r in PAIRS]
        assert contrast.paired and contrast.categories == ["d", "c", "d", "c"]


def test_files_are_read_through_datasets(tmp_path, monkeypatch):
    import datasets

    real, builders = datasets.load_dataset, []

    def spy(path, *args, **kwargs):
        builders.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    for path in _write_all_formats(tmp_path, PAIRS):
        load_contrast_file(path)
    (tmp_path / "h.txt").write_text("one\n")
    load_prompt_list(tmp_path / "h.txt")
    assert builders == ["json", "json", "json", "csv", "parquet", "text"]


def test_csv_cells_stay_text(tmp_path):
    # As csv.DictReader read them: a number-like prompt is not turned into a number (and dropped as "not text").
    (tmp_path / "l.csv").write_text("prompt,label\n007,1\n12,0\n,1\nhow to x,0\n")
    contrast = load_contrast_file(tmp_path / "l.csv")
    assert contrast.harmful == ["007"] and contrast.harmless == ["12", "how to x"]


def test_prompt_lists_from_parquet_and_csv(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"goal": ["a", "b"], "other": [1, 2]}).to_parquet(str(tmp_path / "h.parquet"))
    assert load_prompt_list(tmp_path / "h.parquet") == ["a", "b"]
    (tmp_path / "h.csv").write_text("id,text\n1,first\n2,second\n")
    assert load_prompt_list(tmp_path / "h.csv") == ["first", "second"]
    assert load_prompt_list(tmp_path / "h.csv", column="id") == ["1", "2"]
    with pytest.raises(PromptSetError, match=r"no prompt column; expected one of .*found \['id', 'value'\]"):
        (tmp_path / "n.csv").write_text("id,value\n1,2\n")
        load_prompt_list(tmp_path / "n.csv")


def test_missing_files():
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        load_contrast("/nonexistent/pairs.jsonl")
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        load_prompt_list("/nonexistent/h.txt")
    with pytest.raises(FileNotFoundError, match="no prompt file at '/nonexistent/p.parquet'"):
        load_contrast("/nonexistent/p.parquet")


# ----------------------------------------------------------------------------------------------- datasets hub


def test_hub_name_uses_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"prompt": ["bad", "good"], "label": [1, 0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    contrast = load_contrast("some-org/contrast-set", split="test")
    assert calls == [("some-org/contrast-set", None, "test")]
    assert contrast.harmful == ["bad"] and contrast.harmless == ["good"] and contrast.source == "some-org/contrast-set[test]"


def test_hub_offline_error_points_to_local_files():
    # A real `datasets` call in offline mode, in a subprocess so the offline switches are read at import time.
    code = ("from orthoreg.core.prompts import load_hub_contrast\n"
            "try:\n    load_hub_contrast('no-such-org/no-such-set')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("PromptSetError"), out
    assert "offline mode is on" in out and "--prompts FILE" in out and "--harmful-file" in out


def test_hub_failure_is_a_prompt_set_error(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(PromptSetError, match="could not load the dataset 'org/x'.*local file"):
        load_hub_contrast("org/x")
