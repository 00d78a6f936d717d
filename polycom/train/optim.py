"""AdamW with the official parameter groups, and the warmup + decay learning-rate schedule.

Weight decay applies to matrices only (embeddings included, as in both official setups). It is
skipped for every 1-D parameter (norm gains, biases) and for the PolyCom coefficients, which the
official code excludes explicitly (``polycom.no_weight_decay_names``); the coefficients still
follow the normal learning rate and schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from polycom.activations import no_weight_decay_names
from polycom.train.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` (matrices) and ``no_decay`` (1-D params + PolyCom coefficients).

    Each group also carries ``names`` (parameter names, for logging and tests); shared (tied)
    parameters appear once.
    """
    excluded = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_wd = param.ndim < 2 or name in excluded or name.endswith(".bias")
        (no_decay if no_wd else decay).append((name, param))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; ``foreach`` is left to PyTorch's default for the device."""
    groups = param_groups(model, config.weight_decay)
    for group in groups:
        group.pop("names")
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


@dataclass(frozen=True)
class LRSchedule:
    """``lr(step)`` for 0-based optimiser steps: linear warmup, then decay to a floor.

    warmup (``step < W``): ``lr = peak * (step + 1) / W``;
    decay (``p = min(1, (step - W) / (D - W))``, ``D`` = decay steps):
    cosine ``floor + (peak - floor) * (1 + cos(pi p)) / 2``, linear ``peak - (peak - floor) p``,
    constant ``peak``. The schedule is a pure function of the step, so resuming needs only the step.
    """

    peak: float
    floor: float
    warmup_steps: int
    decay_steps: int
    decay: str

    @classmethod
    def from_config(cls, peak: float, schedule: ScheduleConfig, total_steps: int) -> LRSchedule:
        warmup = schedule.warmup_steps
        if warmup is None:
            warmup = max(1, round(0.05 * total_steps))
        floor = schedule.min_lr if schedule.min_lr is not None else peak * schedule.min_lr_ratio
        if floor > peak:
            raise ValueError(f"schedule.min_lr={floor} is above the peak optim.lr={peak}")
        decay_steps = schedule.decay_steps or total_steps
        return cls(peak, floor, warmup, max(decay_steps, warmup + 1), schedule.decay)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps))
        if self.decay == "cosine":
            return self.floor + (self.peak - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.decay == "linear":
            return self.peak - (self.peak - self.floor) * progress
        return self.peak

    def state_dict(self) -> dict:
        return {
            "peak": self.peak,
            "floor": self.floor,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
            "decay": self.decay,
        }


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
