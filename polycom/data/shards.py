"""Token shards: a corpus tokenised once into flat memmap files, with an index and checksums.

Layout of a prepared directory::

    out_dir/index.json            dtype, vocab, eos id, corpus fingerprint, tokenizer info, and per
                                  split: total tokens, documents, shards [{file, num_tokens, sha256}]
    out_dir/tokenizer.json        the tokenizer that made the ids (so the data is self-contained)
    out_dir/train/00000.bin ...   raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    out_dir/val/00000.bin ...

Each document's ids are followed by the end-of-text id, and documents are concatenated in corpus
order. Prepare writes everything into a sibling temp directory and renames it into place as the
last step, so a process killed mid-prepare leaves no ``out_dir/index.json`` (or the old, complete
one): an index that exists always describes complete shards.

Opening (:class:`TokenShards`) always checks each shard's size against the index (a truncated or
overgrown shard is an error naming the file) and, by default, verifies sha256 checksums when the
split is at most ``VERIFY_AUTO_MAX_BYTES`` (1 GiB; about 1 s per GiB); pass ``verify=True`` to
always verify, ``verify=False`` to skip.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from polycom.data.corpus import Corpus
from polycom.data.tokenizer import Tokenizer
from polycom.fileio import fsync_path

SHARDS_FORMAT = "polycom-shards-v1"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens: 256 MiB per uint16 shard
VERIFY_AUTO_MAX_BYTES = 1 << 30
UINT16_MAX_VOCAB = 1 << 16


def select_dtype(vocab_size: int, dtype: str | None = None) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; a forced dtype is checked."""
    if dtype is None:
        return np.dtype(np.uint16 if vocab_size <= UINT16_MAX_VOCAB else np.uint32)
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"shard dtype must be 'uint16' or 'uint32' (or None for automatic), got {dtype!r}")
    if dtype == "uint16" and vocab_size > UINT16_MAX_VOCAB:
        raise ValueError(
            f"vocab_size {vocab_size} is too large for uint16 shards (ids must be < {UINT16_MAX_VOCAB}); "
            "use dtype='uint32' or leave dtype unset"
        )
    return np.dtype(dtype)


def _chunks(texts: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """Documents grouped so each encode_batch call gets enough work but bounded memory."""
    chunk, chars = [], 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class _ShardWriter:
    """Appends token arrays to numbered shard files of at most ``shard_tokens`` tokens each."""

    def __init__(self, split_dir: Path, dtype: np.dtype, shard_tokens: int):
        self.split_dir, self.dtype, self.shard_tokens = split_dir, dtype, shard_tokens
        split_dir.mkdir(parents=True)
        self.shards: list[dict] = []
        self._handle = None

    def _open_next(self) -> None:
        self._close_current()
        name = f"{len(self.shards):05d}.bin"
        self._handle = open(self.split_dir / name, "wb")  # noqa: SIM115 -- closed in _close_current
        self._hash = hashlib.sha256()
        self.shards.append({"file": f"{self.split_dir.name}/{name}", "num_tokens": 0})

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._handle is None or self.shards[-1]["num_tokens"] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["num_tokens"]
            part, tokens = tokens[:room], tokens[room:]
            data = part.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
            self._handle.write(data)
            self._hash.update(data)
            self.shards[-1]["num_tokens"] += int(part.size)

    def _close_current(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._handle = None

    def close(self) -> list[dict]:
        self._close_current()
        return self.shards


def _write_split(
    texts: Iterable[str], tokenizer: Tokenizer, split_dir: Path, dtype: np.dtype, shard_tokens: int
) -> dict:
    writer = _ShardWriter(split_dir, dtype, shard_tokens)
    num_docs = num_tokens = 0
    try:
        for chunk in _chunks(texts, max_docs=512, max_chars=8_000_000):
            encoded = tokenizer.encode_batch(chunk)  # parallel over documents (Rust threads)
            lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
            flat = np.empty(int(lengths.sum()), dtype=np.int64)
            ends = np.cumsum(lengths)
            for ids, end, length in zip(encoded, ends, lengths, strict=True):
                flat[end - length : end - 1] = ids
            flat[ends - 1] = tokenizer.eos_id
            writer.write(flat)
            num_docs += len(chunk)
            num_tokens += flat.size
    finally:
        shards = writer.close()
    return {"num_tokens": num_tokens, "num_docs": num_docs, "shards": shards}


def prepare_shards(
    corpus: Corpus,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    dtype: str | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = True,
) -> Path:
    """Tokenise ``corpus`` into ``out_dir`` (see the module docstring for the layout); returns out_dir.

    The result appears atomically: built in ``<out_dir>.tmp-<id>`` and renamed into place. If
    ``overwrite`` is false and ``out_dir`` already holds a complete index, it is kept untouched (the
    freshly written copy is discarded), which makes concurrent prepares of the same data safe.
    """
    out_dir = Path(out_dir)
    np_dtype = select_dtype(tokenizer.vocab_size, dtype)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens!r}")
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    tmp_dir = _temp_path(out_dir, "tmp")
    try:
        tmp_dir.mkdir()
        splits = {}
        for split in SPLITS:
            texts = corpus.train if split == "train" else corpus.val
            splits[split] = _write_split(texts, tokenizer, tmp_dir / split, np_dtype, shard_tokens)
            if splits[split]["num_tokens"] == 0:
                raise ValueError(
                    f"corpus {corpus.name!r} has an empty {split} split; add documents or change val_percent"
                )
        tokenizer.save(tmp_dir / "tokenizer.json")
        index = {
            "format": SHARDS_FORMAT,
            "dtype": np_dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "tokenizer": tokenizer.info(),
            "corpus": {"name": corpus.name, "fingerprint": corpus.fingerprint, "info": corpus.info},
            "splits": splits,
        }
        _write_json(tmp_dir / "index.json", index)
        fsync_path(tmp_dir)
        _move_into_place(tmp_dir, out_dir, overwrite)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that is not ours: only an empty dir or a prepared one."""
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or _is_shard_dir(out_dir))):
        raise ValueError(
            f"output {str(out_dir)!r} exists and is not a prepared shard directory; "
            "choose a new or empty directory (prepare replaces only its own output)"
        )


def _is_shard_dir(path: Path) -> bool:
    try:
        return json.loads((path / "index.json").read_text(encoding="utf-8")).get("format") == SHARDS_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _temp_prefix(out_dir: Path, kind: str) -> str:
    return f".{out_dir.name}.{kind}-{socket.gethostname()}-"


def _temp_path(out_dir: Path, kind: str) -> Path:
    return out_dir.with_name(f"{_temp_prefix(out_dir, kind)}{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_dirs(out_dir: Path) -> list[Path]:
    """Delete temp dirs left by prepares of ``out_dir`` that were killed (this host, pid gone).

    Temp dirs are named ``.<name>.tmp-<host>-<pid>-<random>`` (a prepare in progress) or
    ``.<name>.old-<host>-<pid>-<random>`` (a replaced output being deleted); ones from other hosts
    (a shared filesystem) or from live processes are left alone.
    """
    removed = []
    for kind in ("tmp", "old"):
        prefix = _temp_prefix(out_dir, kind)
        for path in out_dir.parent.glob(f"{glob.escape(prefix)}*"):
            pid = path.name[len(prefix) :].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _move_into_place(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename tmp_dir to out_dir; an existing out_dir is replaced (overwrite) or kept (not)."""
    if out_dir.exists():
        if not overwrite and (out_dir / "index.json").is_file():
            return  # someone else finished first; theirs is complete
        trash = _temp_path(out_dir, "old")
        out_dir.rename(trash)
        try:
            tmp_dir.rename(out_dir)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            tmp_dir.rename(out_dir)
        except OSError:
            # a concurrent prepare renamed its copy into place between our check and rename
            if not (out_dir / "index.json").is_file():
                raise
    fsync_path(out_dir.parent)


def read_index(data_dir: str | os.PathLike) -> dict:
    """The parsed ``index.json`` of a prepared directory, with a clear error when there is none."""
    data_dir = Path(data_dir)
    path = data_dir / "index.json"
    if not data_dir.is_dir():
        raise ValueError(f"token shard directory {str(data_dir)!r} does not exist; run `polycom prepare`")
    if not path.is_file():
        raise ValueError(
            f"{str(data_dir)!r} has no index.json: not a prepared shard directory (or a prepare was "
            "interrupted); run `polycom prepare` again"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); prepare the data again") from err
    if index.get("format") != SHARDS_FORMAT:
        raise ValueError(f"{str(path)!r} has format {index.get('format')!r}, expected {SHARDS_FORMAT!r}")
    return index


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class TokenShards:
    """Read-only view of one split of a prepared directory as a single flat token sequence.

    ``num_tokens``, ``dtype``, ``vocab_size``, ``eos_id``, ``index``; ``read(start, length)``
    returns ``np.ndarray[length]`` of the split's tokens ``[start, start + length)`` (crossing shard
    boundaries as needed). See the module docstring for what is validated on open.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", verify: bool | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.data_dir, self.split = Path(data_dir), split
        self.index = read_index(self.data_dir)
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.vocab_size: int = self.index["vocab_size"]
        self.eos_id: int = self.index["eos_id"]
        shards = self.index["splits"][split]["shards"]
        total_bytes = sum(s["num_tokens"] for s in shards) * self.dtype.itemsize
        if verify is None:
            verify = total_bytes <= VERIFY_AUTO_MAX_BYTES
        self._arrays = [self._open_shard(s, verify) for s in shards]
        self._starts = np.cumsum([0] + [a.size for a in self._arrays])
        self.num_tokens = int(self._starts[-1])

    @property
    def fingerprint(self) -> str:
        return self.index["corpus"]["fingerprint"]

    def _open_shard(self, shard: dict, verify: bool) -> np.memmap:
        path = self.data_dir / shard["file"]
        expected = shard["num_tokens"] * self.dtype.itemsize
        if not path.is_file():
            raise ValueError(f"token shard {str(path)!r} listed in index.json is missing")
        actual = path.stat().st_size
        if actual != expected:
            state = "truncated" if actual < expected else "larger than recorded"
            raise ValueError(
                f"token shard {str(path)!r} is {state}: {actual} bytes, index.json says {expected} "
                f"({shard['num_tokens']} {self.dtype.name} tokens); prepare the data again"
            )
        if verify and _file_sha256(path) != shard["sha256"]:
            raise ValueError(
                f"token shard {str(path)!r} is corrupt: its sha256 does not match index.json; "
                "prepare the data again"
            )
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["num_tokens"],))

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split as a new array of the shard dtype."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise ValueError(
                f"read({start}, {length}) is outside the {self.split} split of {self.num_tokens} tokens"
            )
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts, position = [], start
        end = start + length
        for i in range(first, len(self._arrays)):
            if position >= end:
                break
            offset = position - int(self._starts[i])
            take = min(end - position, self._arrays[i].size - offset)
            parts.append(self._arrays[i][offset : offset + take])
            position += take
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (
            f"TokenShards({str(self.data_dir)!r}, split={self.split!r}, num_tokens={self.num_tokens}, "
            f"dtype={self.dtype.name})"
        )
