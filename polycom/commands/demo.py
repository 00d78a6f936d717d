"""``polycom demo``: every registered activation fits the same 1-D function at matched size.

A small, self-contained job that runs in seconds on a laptop CPU: one-hidden-layer MLPs
``down(act(up(x)))`` whose hidden width comes from the activation registry (gated
activations get 2/3 of the width, so every model has the same number of matrix weights),
trained with the same seed, optimiser and steps on ``f(x) = sin(3x) + x**3 / 2`` over
``[-1, 1]``. It prints the final mean-squared error of each.
"""

from __future__ import annotations

import argparse
import time

HELP = "Fit one 1-D function with every activation at matched parameter count (seconds, CPU)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=600, help="Adam steps per activation (default 600)")
    parser.add_argument("--width", type=int, default=24, help="two-matrix hidden width (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def fit_one(name: str, steps: int, width: int, seed: int) -> tuple[float, int]:
    """Train one MLP with activation ``name``; return (final MSE, parameter count)."""
    import torch
    from torch import nn

    from polycom.activations import build_activation, get_activation_spec

    torch.manual_seed(seed)
    spec = get_activation_spec(name)
    hidden = spec.hidden_width(width)
    model = nn.Sequential(
        nn.Linear(1, spec.up_features(hidden)), build_activation(name), nn.Linear(hidden, 1)
    )
    x = torch.linspace(-1, 1, 256).unsqueeze(-1)
    y = torch.sin(3 * x) + x**3 / 2
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = (model(x) - y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = (model(x) - y).square().mean().item()
    return final, sum(p.numel() for p in model.parameters())


def run(args: argparse.Namespace) -> int:
    from polycom.activations import ACTIVATIONS

    for label, value in (("--steps", args.steps), ("--width", args.width)):
        if value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    print(f"fitting sin(3x) + x^3/2 on [-1, 1]: {args.steps} Adam steps, base width {args.width}")
    print(f"{'activation':<14}{'params':>8}{'final MSE':>12}{'seconds':>9}")
    results = {}
    for name in ACTIVATIONS:
        start = time.perf_counter()
        mse, params = fit_one(name, args.steps, args.width, args.seed)
        results[name] = mse
        print(f"{name:<14}{params:>8}{mse:>12.2e}{time.perf_counter() - start:>9.2f}")
    best = min(results, key=results.get)
    print(f"lowest error: {best} ({results[best]:.2e})")
    return 0
