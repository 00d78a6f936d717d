"""``python -m polycom.ops.cpu_build [--force]``: compile the fused CPU kernels into the cache.

The install step (``make install``) runs it so that the first call in every later process only
loads the library. A failed build is not an error: the reference ops still work, and
``impl="auto"`` falls back to them with one warning.
"""

from __future__ import annotations

import sys

from polycom.ops.cpu import build_library


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--force"]):
        print("usage: python -m polycom.ops.cpu_build [--force]", file=sys.stderr)
        return 2
    try:
        path = build_library(force=bool(args))
    except RuntimeError as err:
        print(
            f"polycom: fused CPU kernels not built ({err}); the reference ops will be used", file=sys.stderr
        )
        return 0
    print(f"polycom: fused CPU kernels at {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
