"""Corpora: the stdlib corpus (selection, split, fingerprint, caps) and local / Hugging Face sources."""

import json
import sys
import types

import pytest

from polycom.data import hf_corpus, load_corpus, local_corpus, stdlib_corpus
from polycom.data.corpus import assign_splits, cap_paths, split_bucket, stdlib_files


@pytest.fixture(scope="module")
def stdlib_paths():
    return stdlib_files()


def test_stdlib_files_exclude_tests_and_site_packages(stdlib_paths):
    assert "argparse.py" in stdlib_paths and "json/decoder.py" in stdlib_paths
    for rel in stdlib_paths:
        parts = rel.split("/")
        assert not parts[-1].startswith("test_"), rel
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]), rel
        assert rel.endswith(".py")
    assert list(stdlib_paths) != [] and len(stdlib_paths) > 300


def test_stdlib_corpus_is_deterministic_and_split_by_file():
    first = stdlib_corpus(max_files=60)
    second = stdlib_corpus(max_files=60)
    assert first.fingerprint == second.fingerprint
    assert first.train == second.train and first.val == second.val
    assert len(first.train) + len(first.val) == 60 and first.val and first.train
    # another split rule or cap changes the fingerprint
    assert stdlib_corpus(max_files=60, val_percent=10).fingerprint != first.fingerprint
    assert stdlib_corpus(max_files=61).fingerprint != first.fingerprint


def test_split_is_by_hash_of_the_key_and_about_the_requested_size(stdlib_paths):
    keys = sorted(stdlib_paths)
    is_val = assign_splits(keys, 5.0)
    assert is_val == [split_bucket(k) < 5 for k in keys]  # the stdlib has val files under the plain rule
    assert 0.02 < sum(is_val) / len(keys) < 0.09
    # adding or removing other files never moves a file between splits
    assert assign_splits(keys[::2], 5.0) == is_val[::2]


def test_split_keeps_both_sides_for_small_corpora():
    keys = ["a", "b"]
    assert sorted(assign_splits(keys, 1e-9)) == [False, True]
    assert sorted(assign_splits(keys, 99.999)) == [False, True]
    with pytest.raises(ValueError, match="val_percent must be in"):
        assign_splits(keys, 0)


def test_caps_take_a_fixed_spread_out_slice():
    sizes = {f"pkg{i:03d}/mod.py": 100 for i in range(200)}
    kept = cap_paths(sizes, max_bytes=2_000)
    assert len(kept) == 20 and kept == sorted(kept) == cap_paths(sizes, max_bytes=2_000)
    assert kept[-1] > "pkg100"  # not the alphabetically first twenty
    assert cap_paths(sizes, max_files=7) == cap_paths(sizes, max_files=7, max_bytes=10_000)
    assert len(cap_paths(sizes, max_files=7)) == 7
    with pytest.raises(ValueError, match="max_bytes must be >= 1"):
        cap_paths(sizes, max_bytes=0)


def test_stdlib_corpus_respects_max_bytes():
    corpus = stdlib_corpus(max_bytes=150_000)
    assert 100_000 < corpus.info["bytes"] <= 150_000
    assert sum(len(t.encode()) for t in corpus.train + corpus.val) == corpus.info["bytes"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_local_txt_and_jsonl_folder(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "docs" / "sub" / f"note{i}.txt").write_text(f"note number {i}\n")
    _write_jsonl(tmp_path / "docs" / "rows.jsonl", [{"body": f"row {i}", "id": i} for i in range(30)])
    (tmp_path / "docs" / "ignored.csv").write_text("a,b\n")
    corpus = local_corpus(tmp_path / "docs", text_field="body", val_percent=20)
    texts = sorted(corpus.train + corpus.val)
    assert texts == sorted([f"note number {i}\n" for i in range(5)] + [f"row {i}" for i in range(30)])
    assert corpus.val and corpus.train and corpus.info["documents"] == 35
    # the same files elsewhere give the same fingerprint; other contents do not
    moved = tmp_path / "copy" / "docs"
    moved.parent.mkdir()
    (tmp_path / "docs").rename(moved)
    assert local_corpus(moved, text_field="body", val_percent=20).fingerprint == corpus.fingerprint
    (moved / "sub" / "note0.txt").write_text("changed")
    assert local_corpus(moved, text_field="body", val_percent=20).fingerprint != corpus.fingerprint


def test_local_single_files_and_load_corpus_spec(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha")
    b.write_text("beta")
    corpus = load_corpus([a, b])
    assert sorted(corpus.train + corpus.val) == ["alpha", "beta"]
    assert load_corpus("stdlib", max_files=5).name == "stdlib"


def test_local_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"text": [f"doc {i}" for i in range(40)], "n": list(range(40))}), tmp_path / "d.parquet"
    )
    corpus = local_corpus(tmp_path / "d.parquet")
    assert sorted(corpus.train + corpus.val) == sorted(f"doc {i}" for i in range(40))
    with pytest.raises(ValueError, match="no column 'content'.*columns: \\['text', 'n'\\]"):
        local_corpus(tmp_path / "d.parquet", text_field="content")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing.txt", "data path '.*missing.txt' does not exist"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "holds no .txt/.jsonl/.parquet files"),
        (lambda d: (d / "x.csv").write_text("a") and d / "x.csv", "suffix '.csv'; supported"),
        (
            lambda d: [(d / f"{i}.txt").write_text("") for i in range(2)] and d,
            "is empty: no non-empty documents",
        ),
        (lambda d: (d / "one.txt").write_text("only") and d / "one.txt", "has 1 document, too few"),
        (lambda d: (d / "r.jsonl").write_text('{"txt": "x"}\n') and d / "r.jsonl", "no text field 'text'"),
        (lambda d: (d / "r.jsonl").write_text("{oops\n") and d / "r.jsonl", "line 1 is not valid JSON"),
        (
            lambda d: [(d / "a.txt").write_text("x"), (d / "b.txt").write_text("y")] and [d / "a.txt"] * 2,
            "same name",
        ),
    ],
)
def test_local_corpus_errors_name_the_problem(tmp_path, setup, message):
    with pytest.raises(ValueError, match=message):
        local_corpus(setup(tmp_path))


def test_hf_corpus_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError, no network
    with pytest.raises(ValueError, match="needs the 'datasets' package: pip install"):
        hf_corpus("someone/some-dataset")
    with pytest.raises(ValueError, match="needs the 'datasets' package"):
        load_corpus("hf:someone/some-dataset:config")
    with pytest.raises(ValueError, match="names no dataset"):
        load_corpus("hf:")


def test_hf_corpus_streams_split_rows_with_a_stand_in_datasets_module(monkeypatch):
    """The split / max_docs / field logic, with `datasets.load_dataset` replaced (no network)."""
    calls = []

    def load_dataset(name, config, split, revision, streaming):
        calls.append((name, config, split, revision, streaming))
        return iter([{"text": f"row {i}", "other": i} for i in range(300)])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    corpus = load_corpus("hf:org/data:cfg", max_docs=200, val_percent=10)
    train, val = list(corpus.train), list(corpus.val)
    assert sorted(train + val) == sorted(f"row {i}" for i in range(200))
    assert val == [f"row {i}" for i in range(200) if split_bucket(str(i)) < 10] and len(val) > 5
    assert list(corpus.train) == train  # re-iterable: each pass streams again
    assert calls[0] == ("org/data", "cfg", "train", None, True) and len(calls) == 3
    assert corpus.fingerprint == hf_corpus("org/data", "cfg", max_docs=200, val_percent=10).fingerprint
    assert corpus.fingerprint != hf_corpus("org/data", "cfg", max_docs=201, val_percent=10).fingerprint
    with pytest.raises(ValueError, match="has no field 'body' \\(fields: \\['text', 'other'\\]\\)"):
        list(hf_corpus("org/data", text_field="body").train)
