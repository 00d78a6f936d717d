"""``polycom activations``: the activation registry, with parameter-matched FFN widths."""

from __future__ import annotations

import argparse

HELP = "List the registered activations and their parameter-matched FFN widths."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-width",
        type=int,
        default=8256,
        help="two-matrix FFN width to match (default 8256, the paper's 1B dense model)",
    )
    parser.add_argument("--multiple-of", type=int, default=1, help="round widths to this multiple")


def run(args: argparse.Namespace) -> int:
    from polycom.activations import ACTIVATIONS

    print(f"{'name':<14}{'up-proj':>8}{'width':>8}  options / formula")
    for spec in ACTIVATIONS.values():
        width = spec.hidden_width(args.base_width, args.multiple_of)
        options = f"  [{', '.join(spec.options)}]" if spec.options else ""
        print(f"{spec.name:<14}{spec.num_up_projections:>8}{width:>8}  {spec.summary}{options}")
    return 0
