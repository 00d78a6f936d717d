"""Fused PolyNorm / PolyReLU kernels vs the official reference and torch.compile (CSV + markdown).

The same as ``polycom bench``; kept here so every benchmark lives in ``benchmarks/``:

    python benchmarks/bench_kernels.py --quick              # one shape, < 1 min on 2 cores
    python benchmarks/bench_kernels.py --out runs/bench     # the full table (widths x tokens)
    python benchmarks/bench_kernels.py --device cuda        # GPU: Triton kernels (+ Liger if installed)

See ``polycom/commands/bench.py`` for what is measured and ``docs/kernels.md`` for results.
"""

import sys

from polycom.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
