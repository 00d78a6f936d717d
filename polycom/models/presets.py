"""Model presets as Python functions: the paper's two models and a small ladder for experiments at home.

``get_preset(name, **overrides)`` returns a fresh :class:`ModelConfig`; any field can be overridden
(``get_preset("tiny", activation="polyrelu", vocab_size=512)``), and ``moe`` accepts a dict of
:class:`MoEConfig` fields that are merged into the preset's. Every preset uses a two-matrix width
divisible by 3, so the registry's SwiGLU width (2/3 of it) is exact and all activations of a preset
have the same parameter count up to the 4 PolyCom coefficients per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from polycom.models.config import ModelConfig, MoEConfig, check_moe_fields, field_names

__all__ = ["PRESETS", "get_preset", "list_presets"]

LADDER_VOCAB = 4096
"""Vocabulary of the small presets: a BPE trained on a small corpus; override to match your tokenizer."""


def _config(defaults: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    """``ModelConfig(**defaults)`` with ``overrides`` on top; a ``moe`` dict is merged into the default."""
    merged = {**defaults, **overrides}
    default_moe, moe_override = defaults.get("moe"), overrides.get("moe")
    if isinstance(default_moe, MoEConfig) and isinstance(moe_override, (dict, MoEConfig)):
        if isinstance(moe_override, MoEConfig):
            moe_override = dataclasses.asdict(moe_override)
        merged["moe"] = dataclasses.replace(default_moe, **check_moe_fields(moe_override))
    return ModelConfig(**merged)


def tiny(**overrides) -> ModelConfig:
    """~1.7M parameters (1.05M of them embeddings): d=128, 4 layers; trains on 2 CPU cores in minutes."""
    defaults = dict(vocab_size=LADDER_VOCAB, d_model=128, n_layers=4, n_heads=4, ffn_base_width=384)
    return _config({**defaults, "max_seq_len": 256}, overrides)


def small(**overrides) -> ModelConfig:
    """~13.8M parameters: d=384, 6 layers, 6 heads, two-matrix width 1536 (SwiGLU 1024)."""
    defaults = dict(vocab_size=LADDER_VOCAB, d_model=384, n_layers=6, n_heads=6, ffn_base_width=1536)
    return _config({**defaults, "max_seq_len": 512}, overrides)


def medium(**overrides) -> ModelConfig:
    """~91M parameters: d=768, 12 layers, 12 heads, two-matrix width 3072 (SwiGLU 2048)."""
    defaults = dict(vocab_size=LADDER_VOCAB, d_model=768, n_layers=12, n_heads=12, ffn_base_width=3072)
    return _config({**defaults, "max_seq_len": 1024}, overrides)


def dense_1b(**overrides) -> ModelConfig:
    """The paper's dense 1B (Llama-2 style): 24 layers, d=2048, 16 heads, width 8256 (SwiGLU 5504).

    Llama-2 vocabulary 32000, untied embeddings, seq 4096, RMSNorm eps 1e-5, small init.
    """
    defaults = dict(vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, ffn_base_width=8256)
    return _config({**defaults, "max_seq_len": 4096}, overrides)


def _olmoe_recipe(num_experts: int, top_k: int) -> dict[str, Any]:
    """OLMoE's choices: QK-norm, truncated-normal 0.02 init, lb 0.01, z 0.001, unnormalised gates."""
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, normalize_gates=False)
    return {"qk_norm": True, "init": "moe", "moe": moe}


def moe_tiny(**overrides) -> ModelConfig:
    """~2.9M total / ~1.7M active: d=128, 4 layers, 8 experts top-2, expert width 192 (SwiGLU 128)."""
    defaults = dict(vocab_size=LADDER_VOCAB, d_model=128, n_layers=4, n_heads=4, ffn_base_width=192)
    return _config({**defaults, "max_seq_len": 256, **_olmoe_recipe(8, 2)}, overrides)


def moe_small(**overrides) -> ModelConfig:
    """~22.6M total / ~8.4M active: d=256, 6 layers, 16 experts top-4, expert width 384 (SwiGLU 256)."""
    defaults = dict(vocab_size=LADDER_VOCAB, d_model=256, n_layers=6, n_heads=4, ffn_base_width=384)
    return _config({**defaults, "max_seq_len": 512, **_olmoe_recipe(16, 4)}, overrides)


def moe_1b_7b(**overrides) -> ModelConfig:
    """OLMoE-1B-7B: 16 layers, d=2048, 16 heads, QK-norm, 64 experts top-8, expert width 1536 (SwiGLU 1024).

    Vocabulary 50304 (the padded OLMo embedding), untied embeddings, seq 4096.
    """
    defaults = dict(vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, ffn_base_width=1536)
    return _config({**defaults, "max_seq_len": 4096, **_olmoe_recipe(64, 8)}, overrides)


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "tiny": tiny,
    "small": small,
    "medium": medium,
    "moe-tiny": moe_tiny,
    "moe-small": moe_small,
    "dense-1b": dense_1b,
    "moe-1b-7b": moe_1b_7b,
}


def list_presets() -> list[str]:
    """Names accepted by :func:`get_preset`, smallest dense first."""
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset ``name`` with ``overrides`` applied (unknown name or field -> ``ValueError``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(field_names()))
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid: {', '.join(field_names())}")
    return PRESETS[name](**overrides)
