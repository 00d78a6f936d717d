"""Tokenizers: a byte-level BPE trained on a corpus's train split (cached), or any ``tokenizer.json``.

Every tokenizer carries an end-of-text token (``eos_id``) that :mod:`polycom.data.shards` writes
after each document, so windows that cross a document boundary see an explicit separator.

Trained BPE tokenizers are cached under ``<cache_dir>/tokenizers/bpe-<key>/tokenizer.json`` with
``key = sha256(texts fingerprint, vocab_size, min_frequency, format version)``; the default cache dir
is ``$POLYCOM_CACHE`` or ``~/.cache/polycom``. The ``tokenizers`` library is imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from polycom.data.corpus import Corpus, fingerprint_documents
from polycom.fileio import atomic_write_text
from polycom.paths import cache_dir

EOS_TOKEN = "<|endoftext|>"
BPE_FORMAT = "polycom-bpe-v1"
# Tokens recognised as end-of-text when loading a tokenizer someone else trained, in order of preference.
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
MIN_VOCAB = 256 + 1  # the 256 byte symbols + the end-of-text token


def default_cache_dir() -> Path:
    """The project cache (:func:`polycom.paths.cache_dir`): ``$POLYCOM_CACHE`` or ``~/.cache/polycom``."""
    return cache_dir()


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as err:  # a declared dependency, but say how to get it if it is missing
        raise ValueError(
            "the 'tokenizers' package is needed for tokenizers (a polycom dependency): pip install tokenizers"
        ) from err
    return tokenizers


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with a known end-of-text id.

    ``encode(text) -> list[int]``, ``encode_batch(texts) -> list[list[int]]`` (parallel over
    documents, in Rust threads), ``decode(ids) -> str``; ``vocab_size`` counts every id including
    added special tokens, so a model with ``vocab_size`` embeddings can take any id.
    """

    def __init__(self, backend, eos_token: str | None = None, source: str = ""):
        self.backend = backend
        self.source = source
        self.eos_token = eos_token or _find_eos(backend, source)
        eos_id = backend.token_to_id(self.eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer {source!r} has no token {self.eos_token!r} to use as end-of-text")
        self.eos_id: int = eos_id
        # one past the largest id (not the token count): ids may have holes in imported tokenizers
        self.vocab_size: int = max(backend.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.backend.to_str()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` to ``path`` (a file, or a directory to put it in), atomically."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "tokenizer.json"
        atomic_write_text(path, self.to_json())
        return path

    def info(self) -> dict:
        return {
            "source": self.source,
            "vocab_size": self.vocab_size,
            "eos_token": self.eos_token,
            "eos_id": self.eos_id,
            "sha256": self.sha256(),
        }

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _find_eos(backend, source: str) -> str:
    for token in EOS_CANDIDATES:
        if backend.token_to_id(token) is not None:
            return token
    raise ValueError(
        f"tokenizer {source!r} has none of the end-of-text tokens {list(EOS_CANDIDATES)}; "
        "pass eos_token= with the token that separates documents"
    )


def _texts_fingerprint(texts) -> tuple[str, Iterable[str]]:
    """(fingerprint, texts) -- a Corpus gives its train split and own fingerprint; a list is hashed."""
    if isinstance(texts, Corpus):
        return texts.fingerprint, texts.train
    if isinstance(texts, str):
        raise ValueError("train_bpe expects a list of texts or a Corpus, got a single string")
    texts = list(texts)
    items = ((str(i), t.encode("utf-8", errors="replace")) for i, t in enumerate(texts))
    return fingerprint_documents("texts", items), texts


def bpe_cache_key(fingerprint: str, vocab_size: int, min_frequency: int) -> str:
    settings = {"format": BPE_FORMAT, "fp": fingerprint, "vocab": vocab_size, "min_freq": min_frequency}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def check_vocab_size(vocab_size: int) -> int:
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be an integer >= {MIN_VOCAB} (256 bytes + end-of-text), got {vocab_size!r}"
        )
    return vocab_size


def train_bpe(
    texts: Corpus | Iterable[str],
    vocab_size: int,
    cache_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
    cache: bool = True,
) -> Tokenizer:
    """Train (or load from the cache) a byte-level BPE on ``texts`` (a Corpus: its train split).

    Byte-level: text is first mapped to its UTF-8 bytes (the GPT-2 byte alphabet, all 256 present
    from the start), so any input encodes without unknown tokens; merges are learnt until
    ``vocab_size`` ids exist (fewer if the text runs out of pairs seen ``min_frequency`` times).
    """
    check_vocab_size(vocab_size)
    fingerprint, train_texts = _texts_fingerprint(texts)
    cache_path = None
    if cache:
        key = bpe_cache_key(fingerprint, vocab_size, min_frequency)
        cache_path = Path(cache_dir or default_cache_dir()) / "tokenizers" / f"bpe-{key}" / "tokenizer.json"
        if cache_path.is_file():
            return load_tokenizer(cache_path)
    tk = _import_tokenizers()
    backend = tk.Tokenizer(tk.models.BPE())
    backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(iter(train_texts), trainer=trainer)
    tokenizer = Tokenizer(backend, EOS_TOKEN, source=str(cache_path) if cache_path else "bpe")
    if cache_path is not None:
        tokenizer.save(cache_path)
    return tokenizer


def load_tokenizer(spec: str | os.PathLike | Tokenizer, eos_token: str | None = None) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` path, a directory holding one, or a Hugging Face name.

    A Hugging Face name (``"gpt2"``, ``"org/name"``) is fetched with ``huggingface_hub`` -- from the
    local HF cache when offline (``HF_HUB_OFFLINE=1``); if neither works the error says so.
    """
    if isinstance(spec, Tokenizer):
        return spec
    tk = _import_tokenizers()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            backend = tk.Tokenizer.from_file(str(path))
        except Exception as err:
            raise ValueError(f"{str(path)!r} is not a valid tokenizer.json: {err}") from err
        return Tokenizer(backend, eos_token, source=str(path))
    if not _looks_like_hub_name(str(spec)):
        raise ValueError(
            f"tokenizer path {str(spec)!r} does not exist (expected a tokenizer.json file or a directory "
            "holding one, or a Hugging Face name like 'gpt2' or 'org/name')"
        )
    return Tokenizer(tk.Tokenizer.from_file(_hub_tokenizer_file(str(spec))), eos_token, source=str(spec))


def _looks_like_hub_name(name: str) -> bool:
    """'name' or 'org/name', no file suffix, not a relative/absolute/home path."""
    parts = name.split("/")
    return (
        len(parts) <= 2
        and all(parts)
        and not name.startswith((".", "~", "/"))
        and not name.endswith((".json", ".model"))
    )


def _hub_tokenizer_file(name: str) -> str:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:
        raise ValueError(
            f"tokenizer {name!r} is not a local path, and loading a Hugging Face tokenizer by name "
            "needs huggingface_hub: pip install huggingface_hub"
        ) from err
    try:
        return hf_hub_download(name, "tokenizer.json")
    except Exception as err:  # offline, unknown repo, no tokenizer.json: all one answer for the user
        raise ValueError(
            f"tokenizer {name!r} is not a local path and could not be loaded from the Hugging Face Hub "
            f"or its local cache ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "pass a path to a tokenizer.json, or run where the Hub is reachable once to cache it"
        ) from err
