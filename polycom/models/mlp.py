"""The dense MLP, built from the activation registry so every activation has matched parameters."""

from __future__ import annotations

import torch
from torch import nn

from polycom.activations import build_activation, get_activation_spec
from polycom.models.config import ModelConfig

__all__ = ["MLP"]


class MLP(nn.Module):
    """``y = down(act(up(x)))``, ``x [..., d] -> [..., d]``, no biases.

    ``up: d -> spec.up_features(h)`` (``h`` for two-matrix activations; the fused ``[gate | up]`` of
    width ``2h`` for SwiGLU / GeGLU), ``act: -> h``, ``down: h -> d``. ``h`` is the registry's
    parameter-matched width for ``config.ffn_base_width``. The activation module is named ``act``
    (the official layout), so PolyCom coefficients live at ``...mlp.act.weight`` / ``...mlp.act.bias``.
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        spec = get_activation_spec(config.activation)
        hidden = config.ffn_hidden_width
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.up_proj = nn.Linear(config.d_model, spec.up_features(hidden), **kw)
        self.act = build_activation(config.activation, device=device, dtype=dtype, **config.activation_kwargs)
        self.down_proj = nn.Linear(hidden, config.d_model, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))
