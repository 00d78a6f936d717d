"""Typed model configurations: :class:`ModelConfig` (the transformer) and :class:`MoEConfig` (its MoE MLPs).

Every invalid value fails at construction (``__post_init__``) with a ``ValueError`` that names the
field, the bad value and what would be valid, so a typo in a preset override never reaches a
half-built model. Configs round-trip through JSON with :meth:`ModelConfig.to_dict` /
:meth:`ModelConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from polycom.activations import build_activation, get_activation_spec

__all__ = ["INIT_RECIPES", "ModelConfig", "MoEConfig", "EXPERT_IMPLS", "COEFFICIENT_MODES"]

INIT_RECIPES = ("dense", "moe")
"""``"dense"``: N(0, sqrt(2/(5d))), output projections / sqrt(2L); ``"moe"``: N(0, 0.02) cut at 3 sigma."""

COEFFICIENT_MODES = ("shared", "per_expert")
"""PolyCom coefficients in an MoE layer: one set per layer (the paper) or one per expert."""

EXPERT_IMPLS = ("auto", "loop", "grouped_mm")
"""How experts run: a loop over experts (any device), ``torch._grouped_mm`` (CUDA), or the best available."""


def _check_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_positive_float(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(valid)}; got {value!r}")


@dataclass
class MoEConfig:
    """OLMoE-style mixture of experts replacing every block's MLP.

    ``num_experts`` experts per layer, each token goes to its ``top_k`` highest-probability experts
    (dropless). Gates are the router softmax probabilities of the chosen experts, renormalised to
    sum to 1 over the k when ``normalize_gates`` (OLMoE-1B-7B does not). The auxiliary loss the model
    returns is ``lb_loss_weight * lb_loss + z_loss_weight * z_loss`` averaged over layers.
    """

    num_experts: int = 8
    top_k: int = 2
    normalize_gates: bool = False
    lb_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    coefficients: str = "shared"
    expert_impl: str = "auto"

    def __post_init__(self) -> None:
        _check_int("moe.num_experts", self.num_experts)
        _check_int("moe.top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"moe.top_k={self.top_k} exceeds moe.num_experts={self.num_experts}; "
                f"top_k must be in 1..{self.num_experts}"
            )
        if not isinstance(self.normalize_gates, bool):
            raise ValueError(f"moe.normalize_gates must be a bool, got {self.normalize_gates!r}")
        for name in ("lb_loss_weight", "z_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"moe.{name} must be a number >= 0, got {value!r}")
        _check_choice("moe.coefficients", self.coefficients, COEFFICIENT_MODES)
        _check_choice("moe.expert_impl", self.expert_impl, EXPERT_IMPLS)


@dataclass
class ModelConfig:
    """A Llama-style decoder-only transformer (pre-norm RMSNorm, RoPE, no biases).

    ``ffn_base_width`` is the width of a *two-matrix* MLP (``up: d -> h``, ``down: h -> d``); the
    activation registry derives the parameter-matched width of gated activations (2/3 of it) so
    every activation has the same parameter count. For MoE models it is the expert width.
    ``n_kv_heads=None`` means multi-head attention (``n_kv_heads = n_heads``); fewer is GQA.
    """

    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_base_width: int = 384
    ffn_multiple_of: int = 1
    activation: str = "polynorm"
    activation_kwargs: dict[str, Any] = field(default_factory=dict)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    tie_embeddings: bool = False
    init: str = "dense"
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from JSON / keyword overrides
            self.moe = MoEConfig(**check_moe_fields(self.moe))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field (called at construction)."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_base_width", "ffn_multiple_of"):
            _check_int(name, getattr(self, name))
        _check_int("max_seq_len", self.max_seq_len)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                f"choose n_heads among the divisors of {self.d_model}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        if self.n_kv_heads is not None:
            _check_int("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; "
                    f"choose a divisor of {self.n_heads} (or None for n_heads)"
                )
        _check_positive_float("rope_theta", self.rope_theta)
        _check_positive_float("norm_eps", self.norm_eps)
        for name in ("qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_choice("init", self.init, INIT_RECIPES)
        if not isinstance(self.activation_kwargs, dict):
            raise ValueError(f"activation_kwargs must be a dict, got {self.activation_kwargs!r}")
        get_activation_spec(self.activation)  # unknown name -> ValueError listing the valid ones
        build_activation(self.activation, device="meta", **self.activation_kwargs)  # bad options fail now
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise ValueError(f"moe must be a MoEConfig, a dict or None, got {self.moe!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_heads`` or, if None, ``n_heads``)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_width(self) -> int:
        """The MLP (or expert) hidden width for this activation, matched by the registry."""
        return get_activation_spec(self.activation).hidden_width(self.ffn_base_width, self.ffn_multiple_of)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``moe`` becomes a nested dict or None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` listing the valid ones."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid: {', '.join(field_names())}")
        return cls(**data)


def check_moe_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` if every key is a :class:`MoEConfig` field, else ``ValueError`` listing the valid ones."""
    valid = [f.name for f in dataclasses.fields(MoEConfig)]
    unknown = sorted(set(fields) - set(valid))
    if unknown:
        raise ValueError(f"unknown MoEConfig field(s) {unknown}; valid: {', '.join(valid)}")
    return fields


def field_names() -> list[str]:
    """The names of :class:`ModelConfig`'s fields, in declaration order."""
    return [f.name for f in dataclasses.fields(ModelConfig)]
