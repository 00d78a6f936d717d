"""Token shards: dtype choice, integrity checks on open, atomic prepare; tokenizer loading and caching."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tokenizers

from polycom.data import Tokenizer, TokenShards, load_tokenizer, prepare_shards, select_dtype, train_bpe
from polycom.data.corpus import Corpus
from polycom.data.shards import remove_stale_temp_dirs

WORDS = [f"w{i}" for i in range(70_000)]


def word_tokenizer(vocab: int) -> Tokenizer:
    """A whitespace word-level tokenizer whose ids go up to ``vocab - 1`` (``w<i>`` -> i + 1)."""
    table = {"<|endoftext|>": 0, **{w: i + 1 for i, w in enumerate(WORDS[: vocab - 1])}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(table, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, source="words")


def word_corpus(docs: int = 40, words: int = 50, stride: int = 997) -> Corpus:
    texts = [
        " ".join(WORDS[(d * words + k) * stride % len(WORDS)] for k in range(words)) for d in range(docs)
    ]
    return Corpus(name="words", train=texts[:-4], val=texts[-4:], fingerprint=f"words-{docs}-{words}")


def test_select_dtype():
    assert select_dtype(512) == np.uint16 and select_dtype(65_536) == np.uint16
    assert select_dtype(65_537) == np.uint32 and select_dtype(512, "uint32") == np.uint32
    with pytest.raises(ValueError, match="vocab_size 65537 is too large for uint16 shards"):
        select_dtype(65_537, "uint16")
    with pytest.raises(ValueError, match="must be 'uint16' or 'uint32'"):
        select_dtype(512, "int8")


def test_large_vocab_uses_uint32_and_round_trips(tmp_path):
    tok, corpus = word_tokenizer(70_000), word_corpus()
    out = prepare_shards(corpus, tok, tmp_path / "big")
    train = TokenShards(out, "train")
    assert train.dtype == np.uint32 and json.loads((out / "index.json").read_text())["dtype"] == "uint32"
    tokens = train.read(0, train.num_tokens)
    assert tokens.max() > 65_535
    expected = np.concatenate([tok.encode(t) + [tok.eos_id] for t in corpus.train])
    np.testing.assert_array_equal(tokens, expected)
    with pytest.raises(ValueError, match="too large for uint16"):
        prepare_shards(corpus, tok, tmp_path / "forced", dtype="uint16")
    assert not (tmp_path / "forced").exists()


@pytest.fixture()
def small_dir(tmp_path):
    return prepare_shards(word_corpus(), word_tokenizer(1000), tmp_path / "data", shard_tokens=500)


def test_truncated_shard_is_detected_on_open(small_dir):
    shard = small_dir / "train" / "00001.bin"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 2)
    with pytest.raises(ValueError, match="00001.bin' is truncated: 998 bytes, index.json says 1000"):
        TokenShards(small_dir, "train", verify=False)
    TokenShards(small_dir, "val")  # the other split is fine


def test_corrupt_shard_is_detected_by_checksum(small_dir):
    shard = small_dir / "train" / "00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="00000.bin' is corrupt: its sha256 does not match"):
        TokenShards(small_dir, "train")  # verify=None: small splits are verified
    assert TokenShards(small_dir, "train", verify=False).num_tokens > 0  # skippable for speed


def test_missing_index_or_shard_is_a_clear_error(small_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist; run `polycom prepare`"):
        TokenShards(tmp_path / "nowhere")
    (small_dir / "val" / "00000.bin").unlink()
    with pytest.raises(ValueError, match="00000.bin' listed in index.json is missing"):
        TokenShards(small_dir, "val")
    (small_dir / "index.json").unlink()
    with pytest.raises(ValueError, match="has no index.json: not a prepared shard directory"):
        TokenShards(small_dir, "train")
    with pytest.raises(ValueError, match="split must be one of"):
        TokenShards(small_dir, "test")


class Crash(Exception):
    pass


def failing_tokenizer(after_calls: int) -> Tokenizer:
    tok = word_tokenizer(1000)
    calls = {"n": 0}
    encode_batch = tok.encode_batch

    def encode_then_fail(texts):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Crash("simulated crash mid-prepare")
        return encode_batch(texts)

    tok.encode_batch = encode_then_fail
    return tok


def test_a_crash_mid_prepare_leaves_no_index_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "data"
    with pytest.raises(Crash):
        prepare_shards(word_corpus(), failing_tokenizer(after_calls=1), out)  # train written, val fails
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-made, temp dir removed
    prepare_shards(word_corpus(docs=20), word_tokenizer(1000), out)
    old_index = (out / "index.json").read_bytes()
    with pytest.raises(Crash):
        prepare_shards(word_corpus(docs=30), failing_tokenizer(after_calls=1), out)
    assert (out / "index.json").read_bytes() == old_index
    assert TokenShards(out, "train").num_tokens == 16 * 51


KILL_SCRIPT = """
import os, signal, sys
from polycom.data import shards
from tests.test_data_shards import word_corpus, word_tokenizer

def killed_before_rename(tmp_dir, out_dir, overwrite):
    assert (tmp_dir / "index.json").is_file()  # everything written, only the rename is left
    os.kill(os.getpid(), signal.SIGKILL)

shards._move_into_place = killed_before_rename
shards.prepare_shards(word_corpus(docs=int(sys.argv[2])), word_tokenizer(1000), sys.argv[1])
"""


def test_sigkill_mid_prepare_never_exposes_a_complete_looking_index(tmp_path):
    out = tmp_path / "data"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = [sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(out)]
    proc = subprocess.run([*run, "20"], cwd=root, capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    with pytest.raises(ValueError, match="does not exist"):
        TokenShards(out)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".data.tmp-")]
    assert len(leftovers) == 1  # the killed prepare's temp dir ...
    prepare_shards(word_corpus(docs=20), word_tokenizer(1000), out)
    assert not leftovers[0].exists()  # ... is cleaned by the next prepare (its pid is gone)
    old_index = (out / "index.json").read_bytes()
    proc = subprocess.run([*run, "30"], cwd=root, capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "index.json").read_bytes() == old_index and TokenShards(out).num_tokens == 16 * 51
    assert remove_stale_temp_dirs(out) and not remove_stale_temp_dirs(out)


def test_concurrent_prepare_without_overwrite_keeps_the_first(tmp_path):
    out = prepare_shards(word_corpus(docs=20), word_tokenizer(1000), tmp_path / "d", overwrite=False)
    first = (out / "index.json").read_bytes()
    prepare_shards(word_corpus(docs=30), word_tokenizer(1000), out, overwrite=False)
    assert (out / "index.json").read_bytes() == first and len(list(tmp_path.iterdir())) == 1
    prepare_shards(word_corpus(docs=30), word_tokenizer(1000), out)  # overwrite=True replaces
    assert (out / "index.json").read_bytes() != first


def test_train_bpe_is_cached_by_texts_and_settings(tmp_path):
    texts = [f"def function_{i}(x):\n    return x * {i}\n" for i in range(200)]
    tok = train_bpe(texts, 300, cache_dir=tmp_path)
    assert tok.vocab_size == 300 and tok.eos_id == 0 and tok.eos_token == "<|endoftext|>"
    assert tok.decode(tok.encode("def f(y): return ünïcode")) == "def f(y): return ünïcode"
    cached = list((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1
    again = train_bpe(texts, 300, cache_dir=tmp_path)
    assert again.source == tok.source and again.sha256() == tok.sha256()
    train_bpe(texts, 280, cache_dir=tmp_path)
    train_bpe(texts[:-1], 300, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 3
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 257"):
        train_bpe(texts, 100, cache_dir=tmp_path)


def test_load_tokenizer_paths_and_errors(tmp_path, monkeypatch):
    tok = word_tokenizer(50)
    saved = tok.save(tmp_path / "tok")
    assert saved == tmp_path / "tok" / "tokenizer.json"
    assert load_tokenizer(tmp_path / "tok").sha256() == load_tokenizer(saved).sha256() == tok.sha256()
    with pytest.raises(ValueError, match="tokenizer path '.*nope.json' does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    no_eos = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    no_eos.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(ValueError, match="has none of the end-of-text tokens"):
        load_tokenizer(tmp_path / "no_eos.json")
    assert load_tokenizer(tmp_path / "no_eos.json", eos_token="[UNK]").eos_id == 1
    # a Hugging Face name with no network and an empty HF cache: a clear error, no download attempt
    hub_constants = pytest.importorskip("huggingface_hub.constants")  # read env at import: patch both
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="could not be loaded from the Hugging Face Hub or its local cache"):
        load_tokenizer("someone/not-a-cached-tokenizer")


def test_prepare_never_replaces_a_directory_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a prepared shard directory"):
        prepare_shards(word_corpus(), word_tokenizer(1000), precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert TokenShards(prepare_shards(word_corpus(), word_tokenizer(1000), tmp_path / "empty")).num_tokens
