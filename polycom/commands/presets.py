"""``polycom presets``: every model preset with its parameter counts (computed on the meta device)."""

from __future__ import annotations

import argparse

HELP = "List the model presets with their parameter counts (total, non-embedding, active)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--activation",
        default="polynorm",
        help="MLP activation to count with (default polynorm; see `polycom activations`)",
    )


def run(args: argparse.Namespace) -> int:
    from polycom.activations import get_activation_spec
    from polycom.models import count_params, get_preset, list_presets

    get_activation_spec(args.activation)  # unknown name -> ValueError listing the valid ones
    print(f"activation: {args.activation}")
    header = f"{'preset':<11}{'layers':>7}{'d':>6}{'heads':>6}{'width':>7}{'experts':>9}"
    print(f"{header}{'vocab':>7}{'total':>15}{'non-embedding':>15}{'active':>15}")
    for name in list_presets():
        cfg = get_preset(name, activation=args.activation)  # unknown activation -> ValueError
        experts = f"{cfg.moe.top_k}/{cfg.moe.num_experts}" if cfg.moe else "-"
        counts = [count_params(cfg), count_params(cfg, non_embedding=True), count_params(cfg, active=True)]
        print(
            f"{name:<11}{cfg.n_layers:>7}{cfg.d_model:>6}{cfg.n_heads:>6}{cfg.ffn_hidden_width:>7}{experts:>9}"
            f"{cfg.vocab_size:>7}" + "".join(f"{c:>15,}" for c in counts)
        )
    print("width: MLP (or expert) hidden width; experts: top-k/E; active: parameters used per token")
    return 0
