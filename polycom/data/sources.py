"""Corpora from local files (.txt, .jsonl, .parquet; files or folders) and Hugging Face datasets.

Documents: a ``.txt`` file is one document; each row of a ``.jsonl`` / ``.parquet`` file is one
document (its ``text_field``, default ``"text"``). Folders are searched recursively for those three
suffixes, in sorted path order. Document keys for the split rule are ``<root name>/<relative path>``
(``#<row>`` appended for rows), so moving a folder elsewhere keeps its split and fingerprint.
Empty documents are skipped. See :mod:`polycom.data.corpus` for the split rule and the size caps
(applied per file).

Hugging Face datasets are streamed (``datasets.load_dataset(..., streaming=True)``): ``train`` and
``val`` are re-iterable streams that read the dataset afresh on each pass and split its rows by the
same bucket rule applied to the row number. Their fingerprint is computed from the request (name,
config, split, revision, text field, caps, rule), not the contents, since the contents are not read
up front; pin ``revision`` for a reproducible fingerprint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from polycom.data.corpus import (
    DEFAULT_VAL_PERCENT,
    Corpus,
    assign_splits,
    cap_paths,
    check_val_percent,
    fingerprint_documents,
    split_bucket,
    split_rule,
)

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _find_files(paths: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Document-key prefix -> file, for every supported file under ``paths`` (sorted)."""
    found: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise ValueError(f"data path {str(raw)!r} does not exist")
        if path.is_file():
            if path.suffix not in LOCAL_SUFFIXES:
                raise ValueError(
                    f"data file {str(raw)!r} has suffix {path.suffix!r}; supported: {list(LOCAL_SUFFIXES)}"
                )
            _add_file(found, path.name, path)
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise ValueError(f"data folder {str(raw)!r} holds no {'/'.join(LOCAL_SUFFIXES)} files")
        for file in files:
            _add_file(found, f"{path.resolve().name}/{file.relative_to(path).as_posix()}", file)
    return found


def _add_file(found: dict[str, Path], key: str, path: Path) -> None:
    """Keys identify documents for the split and fingerprint, so two inputs may not share one."""
    if key in found:
        raise ValueError(
            f"data inputs {str(found[key])!r} and {str(path)!r} have the same name {key!r} (or one is "
            "given twice); give each file or folder a distinct name"
        )
    found[key] = path


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{str(path)!r} line {line_number} is not valid JSON: {err}") from err
            if not isinstance(row, dict) or text_field not in row:
                keys = list(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(
                    f"{str(path)!r} line {line_number} has no text field {text_field!r} (has {keys}); "
                    "set text_field to the field holding the text"
                )
            yield str(row[text_field])


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ValueError(
            f"reading {str(path)!r} needs pyarrow: pip install 'polycom[parquet]' (or pip install pyarrow)"
        ) from err
    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(
            f"{str(path)!r} has no column {text_field!r} (columns: {parquet.schema_arrow.names}); "
            "set text_field to the column holding the text"
        )
    for batch in parquet.iter_batches(columns=[text_field]):
        yield from (str(value) for value in batch.column(0).to_pylist() if value is not None)


def _documents(key: str, path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    """(document key, text) pairs of one file."""
    if path.suffix == ".txt":
        yield key, path.read_bytes().decode("utf-8", errors="replace")
    else:
        rows = _read_jsonl(path, text_field) if path.suffix == ".jsonl" else _read_parquet(path, text_field)
        for row_number, text in enumerate(rows):
            yield f"{key}#{row_number}", text


def local_corpus(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    text_field: str = "text",
    val_percent: float = DEFAULT_VAL_PERCENT,
    max_bytes: int | None = None,
    max_files: int | None = None,
) -> Corpus:
    """A corpus from local ``.txt`` / ``.jsonl`` / ``.parquet`` files or folders (read into memory)."""
    check_val_percent(val_percent)
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not paths:
        raise ValueError("local_corpus needs at least one file or folder path")
    files = _find_files(paths)
    kept = cap_paths({key: path.stat().st_size for key, path in files.items()}, max_bytes, max_files)
    docs = [(key, text) for prefix in kept for key, text in _documents(prefix, files[prefix], text_field)]
    docs = [(key, text) for key, text in docs if text]
    if not docs:
        raise ValueError(f"the corpus at {[str(p) for p in paths]} is empty: no non-empty documents found")
    if len(docs) < 2:
        raise ValueError(
            f"the corpus at {[str(p) for p in paths]} has 1 document, too few to split into train and val "
            "(a .txt file is one document); add files, or use a .jsonl file with one document per line"
        )
    rule = f"{split_rule(val_percent)};cap=max_bytes:{max_bytes},max_files:{max_files}"
    fingerprint = fingerprint_documents(rule, ((key, text.encode()) for key, text in docs))
    is_val = assign_splits([key for key, _ in docs], val_percent)
    info = {
        "source": "local",
        "paths": [str(p) for p in paths],
        "files": len(kept),
        "documents": len(docs),
        "text_field": text_field,
        "val_percent": val_percent,
        "max_bytes": max_bytes,
        "max_files": max_files,
    }
    return Corpus(
        name="local",
        train=[text for (_, text), v in zip(docs, is_val, strict=True) if not v],
        val=[text for (_, text), v in zip(docs, is_val, strict=True) if v],
        fingerprint=fingerprint,
        info=info,
    )


class HFStream:
    """One split of a streamed Hugging Face dataset; each iteration streams the dataset afresh."""

    def __init__(self, request: dict, want_val: bool):
        self.request, self.want_val = request, want_val

    def __iter__(self) -> Iterator[str]:
        import datasets

        req = self.request
        stream = datasets.load_dataset(
            req["name"], req["config"], split=req["split"], revision=req["revision"], streaming=True
        )
        for row_number, row in enumerate(stream):
            if req["max_docs"] is not None and row_number >= req["max_docs"]:
                return
            if req["text_field"] not in row:
                raise ValueError(
                    f"dataset {req['name']!r} has no field {req['text_field']!r} (fields: {list(row)}); "
                    "set text_field"
                )
            if (split_bucket(str(row_number)) < req["val_percent"]) == self.want_val and row[
                req["text_field"]
            ]:
                yield str(row[req["text_field"]])


def hf_corpus(
    name: str,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    val_percent: float = DEFAULT_VAL_PERCENT,
    max_docs: int | None = None,
    revision: str | None = None,
) -> Corpus:
    """A streamed Hugging Face dataset (needs the ``datasets`` package and the Hub or its cache)."""
    check_val_percent(val_percent)
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1 (or None), got {max_docs!r}")
    try:
        import datasets  # noqa: F401 -- checked here so the error comes before any work
    except ImportError as err:
        raise ValueError(
            f"streaming the Hugging Face dataset {name!r} needs the 'datasets' package: "
            "pip install 'polycom[hf-data]'"
        ) from err
    request = {
        "name": name,
        "config": config,
        "split": split,
        "revision": revision,
        "text_field": text_field,
        "val_percent": val_percent,
        "max_docs": max_docs,
    }
    rule = f"{split_rule(val_percent)};hf-request"
    fingerprint = fingerprint_documents(rule, [("request", json.dumps(request, sort_keys=True).encode())])
    info = {"source": "hf", **request}
    return Corpus(
        name="hf",
        train=HFStream(request, want_val=False),
        val=HFStream(request, want_val=True),
        fingerprint=fingerprint,
        info=info,
    )
