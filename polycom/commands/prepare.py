"""``polycom prepare``: tokenise a corpus once into memmap token shards (cached by default)."""

from __future__ import annotations

import argparse

HELP = "Tokenise a corpus (stdlib, local files, or a Hugging Face dataset) into memmap token shards."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        nargs="+",
        default=["stdlib"],
        help="'stdlib' (default: the Python standard library), 'hf:NAME[:CONFIG]', or .txt/.jsonl/.parquet "
        "files or folders",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json path, a directory holding one, or a Hugging Face name "
        "(default: train a byte-level BPE on the train split)",
    )
    parser.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 4096)")
    parser.add_argument(
        "--out", default=None, help="output directory (default: a cache dir keyed by content)"
    )
    parser.add_argument(
        "--cache-dir", default=None, help="cache directory (default $POLYCOM_CACHE or ~/.cache/polycom)"
    )
    parser.add_argument("--val-percent", type=float, default=5.0, help="percent of documents for validation")
    parser.add_argument(
        "--max-bytes", type=int, default=None, help="keep a deterministic slice of this many bytes"
    )
    parser.add_argument(
        "--max-files", type=int, default=None, help="keep a deterministic slice of this many files"
    )
    parser.add_argument(
        "--max-docs", type=int, default=None, help="Hugging Face datasets: stop after this many rows"
    )
    parser.add_argument(
        "--text-field", default="text", help="the .jsonl field / .parquet column / dataset field"
    )
    parser.add_argument(
        "--check",
        metavar="DIR",
        default=None,
        help="instead of preparing: verify a prepared directory (sizes and sha256 of every shard)",
    )
    parser.add_argument("--dtype", choices=["uint16", "uint32"], default=None, help="force the token dtype")
    parser.add_argument(
        "--shard-tokens", type=int, default=None, help="tokens per shard file (default 2**27)"
    )


def run(args: argparse.Namespace) -> int:
    import time

    from polycom.data.prepare import DEFAULT_VOCAB_SIZE, prepare_data
    from polycom.data.shards import read_index

    if args.check is not None:
        return _check(args.check)
    if args.tokenizer is not None and args.vocab_size is not None:
        raise ValueError(
            "--vocab-size sets the size of a BPE trained here; it cannot be used with --tokenizer"
        )
    data = args.data[0] if len(args.data) == 1 else args.data
    if len(args.data) > 1 and any(d == "stdlib" or d.startswith("hf:") for d in args.data):
        raise ValueError(f"--data takes 'stdlib', one 'hf:NAME', or local paths, got {args.data}")
    started = time.perf_counter()
    out = prepare_data(
        data,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size or DEFAULT_VOCAB_SIZE,
        out_dir=args.out,
        cache_dir=args.cache_dir,
        val_percent=args.val_percent,
        max_bytes=args.max_bytes,
        max_files=args.max_files,
        text_field=args.text_field,
        max_docs=args.max_docs,
        dtype=args.dtype,
        shard_tokens=args.shard_tokens,
    )
    index = read_index(out)
    splits = index["splits"]
    print(f"data dir     {out}")
    print(f"corpus       {index['corpus']['name']}  fingerprint {index['corpus']['fingerprint'][:16]}")
    print(f"tokenizer    vocab {index['vocab_size']}  eos id {index['eos_id']}  dtype {index['dtype']}")
    for split in ("train", "val"):
        info = splits[split]
        counts = f"{info['num_tokens']:>12,} tokens  {info['num_docs']:>8,} docs"
        print(f"{split:<12} {counts}  {len(info['shards'])} shards")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


def _check(data_dir: str) -> int:
    from polycom.data.shards import TokenShards

    for split in ("train", "val"):
        shards = TokenShards(data_dir, split, verify=True)  # raises ValueError naming a bad shard
        print(f"{split:<6} ok: {shards.num_tokens:,} {shards.dtype.name} tokens, checksums match")
    return 0
