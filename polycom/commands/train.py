"""``polycom train``: pre-train a model preset on the embedded corpus or your data, laptop to cluster.

Any config key can be set in dotted form (``--model.activation polyrelu``, ``--optim.lr 1e-3``,
``--run.parallel fsdp``); the common ones also have short flags. Under ``torchrun`` the same command
trains with DDP or FSDP2: ``torchrun --nproc_per_node=8 -m polycom.cli train --preset small ...``.
"""

from __future__ import annotations

import argparse
import json
import sys

HELP = "Pre-train a model preset (dotted overrides like --optim.lr 1e-3; --dry-run to inspect)."

# short flag -> dotted config key
SHORTCUTS = {
    "activation": "model.activation",
    "out": "run.out",
    "seed": "run.seed",
    "max_steps": "run.max_steps",
    "tokens": "run.max_tokens",
    "checkpoint_every": "run.checkpoint_every",
    "data": "data.source",
    "tokenizer": "data.tokenizer",
}

EPILOG = """\
dotted overrides (any config key; see --dry-run for all of them):
  --model.activation polyrelu   --model.n_layers 8   --model.moe.num_experts 16
  --optim.lr 1e-3   --schedule.decay linear   --data.seq_len 256   --data.batch_size 64
  --run.parallel fsdp   --run.eval_every 100   --run.on_nonfinite stop   --run.tensorboard true
"""


def split_dotted(args: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Separate ``--section.key value`` / ``--section.key=value`` pairs from the other arguments."""
    dotted, rest = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." not in key:
            rest.append(arg)
            i += 1
            continue
        if "=" in arg:
            dotted.append((key, arg.split("=", 1)[1]))
            i += 1
        elif i + 1 < len(args):
            dotted.append((key, args[i + 1]))
            i += 2
        else:
            raise SystemExit(f"polycom train: error: --{key} needs a value")
    return dotted, rest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--preset", default="tiny", help="model preset (default tiny; see `polycom presets`)")
    parser.add_argument("--activation", help="MLP activation, e.g. polynorm, polyrelu, swiglu, gelu")
    parser.add_argument("--out", help="run folder (default runs/<preset>-<activation>-s<seed>)")
    parser.add_argument("--seed", help="random seed for init and data order (default 0)")
    parser.add_argument("--max-steps", help="optimiser steps (default 200)")
    parser.add_argument("--tokens", help="token budget instead of --max-steps, e.g. 2e6")
    parser.add_argument("--checkpoint-every", help="checkpoint interval in steps (0: only at the end)")
    parser.add_argument(
        "--data", help="'stdlib' (default), file/folder paths, 'hf:NAME', or a prepared folder"
    )
    parser.add_argument("--tokenizer", help="tokenizer.json or HF name (default: train a BPE on the data)")
    parser.add_argument("--resume", help="checkpoint or run folder to continue, or 'auto' (latest in --out)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config, sizes, memory; exit"
    )
    parser.set_defaults(overrides=[])

    # argparse cannot accept arbitrary --a.b flags, so they are taken out before it parses the rest
    # (and validated, with suggestions, by the config builder).
    plain_parse = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        dotted, rest = split_dotted(list(sys.argv[1:] if args is None else args))
        namespace, extras = plain_parse(rest, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", [])) + dotted
        return namespace, extras

    parser.parse_known_args = parse_known_args


def collect_overrides(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Short flags first, then the dotted ones (so a dotted key given later wins)."""
    short = [(key, getattr(args, flag)) for flag, key in SHORTCUTS.items() if getattr(args, flag) is not None]
    return short + list(args.overrides)


def dry_run(config) -> None:
    import os

    import torch

    from polycom.models import Transformer
    from polycom.train.distributed import resolve_parallel
    from polycom.train.memory import estimate_memory, format_bytes

    world = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = resolve_parallel(config.run.parallel, world)
    if not config.model_vocab_explicit:
        config.model.vocab_size = config.data.vocab_size  # the BPE target; a given tokenizer may differ
    with torch.device("meta"):
        model = Transformer(config.model)
    seq_len = config.data.seq_len or config.model.max_seq_len
    if seq_len > config.model.max_seq_len:
        raise ValueError(
            f"data.seq_len={seq_len} is larger than the model's max_seq_len={config.model.max_seq_len}"
        )
    config.data.seq_len = seq_len
    print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    total, active = model.num_params(), model.num_params(active=True)
    print(
        f"parameters: {total:,} total, {model.num_params(non_embedding=True):,} non-embedding, "
        f"{active:,} active per token"
    )
    print(f"flops per token: {model.flops_per_token(seq_len):.3e}")
    bf16 = config.run.dtype == "bfloat16" or (config.run.dtype == "auto" and torch.cuda.is_available())
    memory = estimate_memory(config, world, parallel, bf16)
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in memory.items() if k != "total")
    print(
        f"memory per device (rough, {world} process(es), {parallel}): {format_bytes(memory['total'])} "
        f"({parts})"
    )


def run(args: argparse.Namespace) -> int:
    from polycom.train.config import build_config

    config = build_config(args.preset, collect_overrides(args))
    if args.dry_run:
        dry_run(config)
        return 0
    from polycom.train.loop import TrainingStopped, train

    try:
        train(config, resume=args.resume)
    except TrainingStopped as err:
        print(f"polycom train: {err}", file=sys.stderr)
        return 1
    return 0
