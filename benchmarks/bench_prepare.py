"""Time the data pipeline on the embedded stdlib corpus: corpus read, BPE training, tokenise + write.

Each configuration runs in a fresh process with a fresh cache (nothing reused), once with the
`tokenizers` thread pool on (the default: parallel over documents) and once with it off
(TOKENIZERS_PARALLELISM=false), so the two rows are measured side by side on the same machine.

    python benchmarks/bench_prepare.py [--vocab-size 4096] [--max-bytes N]

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, tempfile, time
from polycom.data import TokenShards, prepare_shards, stdlib_corpus, train_bpe
vocab, max_bytes = int(sys.argv[1]), (int(sys.argv[2]) or None)
cache = tempfile.mkdtemp()
t0 = time.perf_counter(); corpus = stdlib_corpus(max_bytes=max_bytes)
t1 = time.perf_counter(); tok = train_bpe(corpus, vocab, cache_dir=cache)
t2 = time.perf_counter(); out = prepare_shards(corpus, tok, cache + "/shards")
t3 = time.perf_counter(); train = TokenShards(out, "train", verify=True)
t4 = time.perf_counter()
tokens = train.num_tokens + TokenShards(out, "val").num_tokens
print(json.dumps({"bytes": corpus.info["bytes"], "tokens": tokens, "corpus_s": t1 - t0,
                  "bpe_s": t2 - t1, "shards_s": t3 - t2, "open_verify_s": t4 - t3}))
"""


def measure(vocab_size: int, max_bytes: int, parallel: bool) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true" if parallel else "false")
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(vocab_size), str(max_bytes)],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-bytes", type=int, default=0, help="0 = the whole stdlib")
    args = parser.parse_args()
    print(f"stdlib prepare, vocab {args.vocab_size}, {os.cpu_count()} CPUs\n")
    print(
        "| tokenizers threads | MB | tokens | corpus s | BPE s | tokenise+write s | open+verify s | total s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for parallel in (True, False):
        r = measure(args.vocab_size, args.max_bytes, parallel)
        total = r["corpus_s"] + r["bpe_s"] + r["shards_s"]
        print(
            f"| {'all cores' if parallel else 'one'} | {r['bytes'] / 1e6:.1f} | {r['tokens']:,} | "
            f"{r['corpus_s']:.2f} | {r['bpe_s']:.2f} | {r['shards_s']:.2f} | {r['open_verify_s']:.3f} | "
            f"{total:.2f} |"
        )


if __name__ == "__main__":
    main()
