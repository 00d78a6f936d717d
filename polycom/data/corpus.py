"""Text corpora: the embedded default (the Python standard library) and its train/validation split.

A :class:`Corpus` is two collections of document texts (``train``, ``val``) plus a ``fingerprint``:
a sha256 over everything that decides which tokens a run sees (file paths, contents, the split rule
and the size cap), so two runs with the same fingerprint trained on the same text.

Split rule (by document, never by position inside a document):

    bucket(key) = int(sha256("polycom-split:" + key)[:16], 16) mod 100
    document -> val  if bucket(key) < val_percent  else train

where ``key`` is the file's path relative to the corpus root (plus ``#row`` for one row of a
.jsonl/.parquet file). If the rule leaves a split empty while the corpus has >= 2 documents, the
document with the lowest (highest) bucket hash moves to val (train), so every such corpus has both.

Size cap (``max_bytes`` / ``max_files``): files are taken in the order of
``sha256("polycom-order:" + relative path)`` -- a fixed pseudo-random order, so a capped slice
covers the whole library rather than the alphabetically first packages -- until the cap is hit;
the kept files are then listed in sorted path order. A file that would exceed ``max_bytes`` is
skipped, and smaller ones after it may still fit.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CORPUS_FORMAT = "polycom-corpus-v1"
DEFAULT_VAL_PERCENT = 5.0

# Directory names whose .py files are tests, not library code (test/, tests/, idlelib/idle_test, ...).
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Directories of the stdlib tree that hold other packages or build data, never library source.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """Train and validation document texts with a content fingerprint.

    ``train`` / ``val`` are lists of strings for the stdlib and local files; for a streamed
    Hugging Face dataset they are re-iterable streams (iterate them, do not index them).
    """

    name: str
    train: Sequence[str] | Iterable[str]
    val: Sequence[str] | Iterable[str]
    fingerprint: str
    info: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        sizes = ""
        if isinstance(self.train, Sequence) and isinstance(self.val, Sequence):
            sizes = f", train_docs={len(self.train)}, val_docs={len(self.val)}"
        return f"Corpus(name={self.name!r}{sizes}, fingerprint={self.fingerprint[:12]}...)"


def _bucket_hash(salt: str, key: str) -> int:
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:16], 16)


def split_bucket(key: str) -> int:
    """The 0..99 bucket of a document key; documents with ``bucket < val_percent`` go to val."""
    return _bucket_hash("polycom-split", key) % 100


def check_val_percent(val_percent: float) -> float:
    if not 0 < val_percent < 100:
        raise ValueError(f"val_percent must be in (0, 100), got {val_percent!r}")
    return float(val_percent)


def assign_splits(keys: Sequence[str], val_percent: float) -> list[bool]:
    """``is_val`` flag for each key by the split rule (see the module docstring)."""
    check_val_percent(val_percent)
    is_val = [split_bucket(key) < val_percent for key in keys]
    if len(keys) >= 2 and all(is_val):
        is_val[max(range(len(keys)), key=lambda i: _bucket_hash("polycom-split", keys[i]))] = False
    elif len(keys) >= 2 and not any(is_val):
        is_val[min(range(len(keys)), key=lambda i: _bucket_hash("polycom-split", keys[i]))] = True
    return is_val


def split_rule(val_percent: float) -> str:
    """The split rule as text; it enters every fingerprint."""
    return f"{CORPUS_FORMAT};split=sha256-bucket<{val_percent:g}"


def cap_paths(sizes: dict[str, int], max_bytes: int | None = None, max_files: int | None = None) -> list[str]:
    """Relative paths kept under the caps (pseudo-random fixed order), returned sorted."""
    for name, value in (("max_bytes", max_bytes), ("max_files", max_files)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 (or None for no cap), got {value!r}")
    if max_bytes is None and max_files is None:
        return sorted(sizes)
    order = sorted(sizes, key=lambda rel: (_bucket_hash("polycom-order", rel), rel))
    kept, total = [], 0
    for rel in order:
        if max_files is not None and len(kept) >= max_files:
            break
        if max_bytes is not None and total + sizes[rel] > max_bytes:
            continue
        kept.append(rel)
        total += sizes[rel]
    return sorted(kept)


def _is_stdlib_source(rel: Path) -> bool:
    if rel.suffix != ".py" or rel.name.startswith("test_"):
        return False
    dirs = rel.parts[:-1]
    return not any(part in _TEST_DIRS or part in _SKIP_DIRS for part in dirs)


def stdlib_files(root: str | os.PathLike | None = None) -> dict[str, Path]:
    """The standard library's non-test ``.py`` files: relative posix path -> absolute path."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"standard library directory {str(root)!r} does not exist")
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        # prune in place: never descend into site-packages or test directories
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and d not in _TEST_DIRS)
        for filename in filenames:
            path = Path(dirpath, filename)
            rel = path.relative_to(root)
            if _is_stdlib_source(rel):
                files[rel.as_posix()] = path
    return files


def fingerprint_documents(rule: str, items: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over the rule text and each (key, content) pair, in the given order."""
    digest = hashlib.sha256(rule.encode())
    for key, content in items:
        digest.update(b"\0" + key.encode() + b"\0" + str(len(content)).encode() + b"\0")
        digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()


def _decode(content: bytes) -> str:
    # The stdlib is UTF-8 (PEP 3120); "replace" keeps the odd non-UTF-8 file deterministic.
    return content.decode("utf-8", errors="replace")


def stdlib_corpus(
    val_percent: float = DEFAULT_VAL_PERCENT,
    max_bytes: int | None = None,
    max_files: int | None = None,
    root: str | os.PathLike | None = None,
) -> Corpus:
    """The running interpreter's standard library as a corpus (one document per ``.py`` file).

    Tests (``test/``, ``tests/``, ``idlelib/idle_test``, ``test_*.py``) and ``site-packages`` are
    excluded. ``max_bytes`` / ``max_files`` keep a deterministic slice (see the module docstring).
    """
    check_val_percent(val_percent)
    files = stdlib_files(root)
    kept = cap_paths({rel: path.stat().st_size for rel, path in files.items()}, max_bytes, max_files)
    if not kept:
        raise ValueError(
            f"the standard library at {str(root or sysconfig.get_paths()['stdlib'])!r} gave no files "
            f"(max_bytes={max_bytes}, max_files={max_files}); raise the cap"
        )
    contents = [files[rel].read_bytes() for rel in kept]
    rule = f"{split_rule(val_percent)};cap=max_bytes:{max_bytes},max_files:{max_files}"
    fingerprint = fingerprint_documents(rule, zip(kept, contents, strict=True))
    is_val = assign_splits(kept, val_percent)
    train = [_decode(c) for c, v in zip(contents, is_val, strict=True) if not v]
    val = [_decode(c) for c, v in zip(contents, is_val, strict=True) if v]
    info = {
        "source": "stdlib",
        "root": str(root or sysconfig.get_paths()["stdlib"]),
        "files": len(kept),
        "bytes": sum(len(c) for c in contents),
        "val_percent": val_percent,
        "max_bytes": max_bytes,
        "max_files": max_files,
    }
    return Corpus(name="stdlib", train=train, val=val, fingerprint=fingerprint, info=info)
