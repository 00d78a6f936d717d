"""The data pipeline end to end on a small stdlib slice: corpus -> BPE -> shards -> loader."""

import json

import numpy as np
import pytest
import torch

from polycom.data import (
    TokenShards,
    ValidationWindows,
    WindowLoader,
    load_tokenizer,
    prepare_data,
    prepare_default,
    prepare_shards,
    stdlib_corpus,
    train_bpe,
    unigram_entropy,
)

SLICE = 400_000  # bytes of the stdlib: enough for a few hundred thousand tokens, fast to prepare


@pytest.fixture(scope="module")
def corpus():
    return stdlib_corpus(max_bytes=SLICE)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    return train_bpe(corpus, 512, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def data_dir(corpus, tokenizer, tmp_path_factory):
    return prepare_shards(corpus, tokenizer, tmp_path_factory.mktemp("shards") / "data", shard_tokens=20_000)


def test_shards_round_trip_to_the_corpus_text(corpus, tokenizer, data_dir):
    train = TokenShards(data_dir, "train", verify=True)
    assert len(train._arrays) > 1  # several shards, so reads cross boundaries
    tokens = train.read(0, train.num_tokens)
    assert tokens.dtype == np.uint16 and train.num_tokens == tokens.size
    docs = np.split(tokens, np.flatnonzero(tokens == tokenizer.eos_id) + 1)[:-1]
    assert len(docs) == len(corpus.train)
    for doc, text in zip(docs[:5], corpus.train[:5], strict=True):
        assert doc[-1] == tokenizer.eos_id
        assert tokenizer.decode(doc[:-1].tolist()) == text
    # a read across a shard boundary equals the same slice of the full sequence
    boundary = train._arrays[0].size
    np.testing.assert_array_equal(train.read(boundary - 7, 20), tokens[boundary - 7 : boundary + 13])


def test_index_records_fingerprint_dtype_and_checksums(corpus, tokenizer, data_dir):
    index = json.loads((data_dir / "index.json").read_text())
    assert index["corpus"]["fingerprint"] == corpus.fingerprint
    assert index["dtype"] == "uint16" and index["vocab_size"] == tokenizer.vocab_size == 512
    for split in ("train", "val"):
        shards = index["splits"][split]["shards"]
        assert all(len(s["sha256"]) == 64 for s in shards)
        assert sum(s["num_tokens"] for s in shards) == index["splits"][split]["num_tokens"]
    assert load_tokenizer(data_dir).sha256() == tokenizer.sha256()


def test_loader_windows_are_shifted_slices_of_the_split(data_dir):
    train = TokenShards(data_dir, "train")
    loader = WindowLoader(train, seq_len=32, batch_size=4, seed=3)
    inputs, targets = loader.batch(5)
    assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == torch.int64
    torch.testing.assert_close(inputs[:, 1:], targets[:, :-1])
    full = torch.from_numpy(train.read(0, train.num_tokens).astype(np.int64))
    for start, row in zip(loader.global_starts(5).tolist(), inputs, strict=True):
        torch.testing.assert_close(full[start : start + 32], row)


def test_loader_is_deterministic_and_rank_aware(data_dir):
    train = TokenShards(data_dir, "train")
    single = WindowLoader(train, seq_len=16, batch_size=6, seed=7)
    for step in (0, 1, 9):
        again = WindowLoader(train, seq_len=16, batch_size=6, seed=7).batch(step)
        whole = single.batch(step)
        torch.testing.assert_close(again, whole)
        parts = [WindowLoader(train, 16, 2, seed=7, rank=r, world_size=3).batch(step) for r in range(3)]
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole[0])
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), whole[1])
    assert not torch.equal(single.batch(0)[0], single.batch(1)[0])
    assert not torch.equal(single.batch(0)[0], WindowLoader(train, 16, 6, seed=8).batch(0)[0])


def test_validation_windows_are_fixed_and_cover_the_split(data_dir):
    val = TokenShards(data_dir, "val")
    first = list(ValidationWindows(val, seq_len=32, batch_size=5, max_windows=12))
    second = list(ValidationWindows(val, seq_len=32, batch_size=5, max_windows=12))
    assert [b[0].shape[0] for b in first] == [5, 5, 2]
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)
    everything = ValidationWindows(val, seq_len=32, batch_size=1000)
    assert everything.num_windows == (val.num_tokens - 1) // 32
    ranks = [ValidationWindows(val, 32, 5, max_windows=12, rank=r, world_size=5).window_ids for r in range(5)]
    assert sum(ranks, []) == ValidationWindows(val, 32, 5, max_windows=12).window_ids
    assert sorted(len(ids) for ids in ranks) == [2, 2, 2, 3, 3]


def test_unigram_entropy_matches_a_direct_computation(data_dir):
    train, val = TokenShards(data_dir, "train"), TokenShards(data_dir, "val")
    counts = np.bincount(train.read(0, train.num_tokens), minlength=train.vocab_size).astype(float)
    log_p = np.log((counts + 1) / (counts.sum() + train.vocab_size))
    expected = -log_p[val.read(0, val.num_tokens).astype(np.int64)].mean()
    assert unigram_entropy(data_dir) == pytest.approx(expected, rel=1e-9)
    assert 3.0 < expected < np.log(train.vocab_size)


def test_prepare_default_caches_and_reuses(tmp_path):
    first = prepare_default(cache_dir=tmp_path, vocab_size=300, max_bytes=100_000)
    stamp = (first / "index.json").stat().st_mtime_ns
    second = prepare_default(cache_dir=tmp_path, vocab_size=300, max_bytes=100_000)
    assert second == first and (second / "index.json").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "shards").iterdir())) == 1
    other = prepare_default(cache_dir=tmp_path, vocab_size=320, max_bytes=100_000)
    assert other != first and TokenShards(other, "val").vocab_size == 320


def test_loader_state_and_bad_arguments(data_dir):
    train = TokenShards(data_dir, "train")
    loader = WindowLoader(train, seq_len=16, batch_size=2, seed=11)
    resumed = WindowLoader(train, seq_len=16, batch_size=2, seed=0)
    resumed.load_state_dict(loader.state_dict())
    torch.testing.assert_close(resumed.batch(42), loader.batch(42))
    with pytest.raises(ValueError, match="loader state has seq_len=16, but this loader has seq_len=8"):
        WindowLoader(train, seq_len=8, batch_size=2).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match=f"has only {train.num_tokens}; use a shorter seq_len"):
        WindowLoader(train, seq_len=train.num_tokens, batch_size=1)
    with pytest.raises(ValueError, match="rank must be in \\[0, world_size=2\\), got 2"):
        WindowLoader(train, 16, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        WindowLoader(train, 16, 0)
    with pytest.raises(ValueError, match="fewer than one window"):
        ValidationWindows(TokenShards(data_dir, "val"), seq_len=10**9, batch_size=1)


def test_prepare_command(tmp_path, capsys):
    from polycom.cli import main

    (tmp_path / "docs").mkdir()
    for i in range(6):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document {i} " * 50)
    args = [
        "prepare",
        "--data",
        str(tmp_path / "docs"),
        "--vocab-size",
        "270",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main([*args, "--out", str(tmp_path / "out"), "--val-percent", "30"]) == 0
    out = capsys.readouterr().out
    assert f"data dir     {tmp_path / 'out'}" in out and "dtype uint16" in out
    assert TokenShards(tmp_path / "out", "val").num_tokens > 0
    assert main(["prepare", "--check", str(tmp_path / "out")]) == 0
    assert "val    ok: " in capsys.readouterr().out
    shard = tmp_path / "out" / "val" / "00000.bin"
    shard.write_bytes(shard.read_bytes()[::-1])
    assert main(["prepare", "--check", str(tmp_path / "out")]) == 2
    assert "00000.bin' is corrupt" in capsys.readouterr().err
    assert main(["prepare", "--data", str(tmp_path / "missing")]) == 2
    assert "polycom prepare: error: data path" in capsys.readouterr().err
    assert main([*args, "--tokenizer", str(tmp_path / "out")]) == 2
    assert "cannot be used with --tokenizer" in capsys.readouterr().err


def test_bpe_that_runs_out_of_pairs_says_so(tmp_path, capsys):
    """Asking for more tokens than the corpus supports trains a smaller BPE and prints a note."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"d{i}.txt").write_text("abc abd " * 20 + str(i))
    out = prepare_data(str(docs), vocab_size=5000, out_dir=tmp_path / "out", cache_dir=tmp_path / "c")
    err = capsys.readouterr().err
    assert "stopped at" in err and "asked for 5,000" in err
    assert (out / "index.json").is_file()
