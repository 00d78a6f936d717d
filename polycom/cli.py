"""The ``polycom`` command line: one subcommand per module in :mod:`polycom.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``;
heavy imports happen inside ``run`` so that ``polycom --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module; the order is the order shown by --help.
COMMANDS: dict[str, str] = {
    "demo": "polycom.commands.demo",
    "activations": "polycom.commands.activations",
    "train": "polycom.commands.train",
    "prepare": "polycom.commands.prepare",
    "presets": "polycom.commands.presets",
    "bench": "polycom.commands.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polycom",
        description="Polynomial composition activations (PolyReLU, PolyNorm): modules, models, training.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ValueError as err:  # bad user input: one clear line, no traceback
        print(f"polycom {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
