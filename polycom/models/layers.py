"""Transformer building blocks: RMSNorm, rotary position embeddings, causal attention with a KV cache.

Shapes: ``B`` batch, ``T`` new tokens, ``S`` cached + new tokens, ``H`` query heads, ``G`` key/value
heads (``H % G == 0``; ``G < H`` is grouped-query attention), ``D`` head dim, ``d`` model width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polycom.models.config import ModelConfig

__all__ = ["Attention", "KVCache", "RMSNorm", "apply_rope", "rope_angles"]

# ``enable_gqa`` lets SDPA broadcast G key/value heads over H query heads without copies (torch >= 2.5).
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2, -1) + eps) * weight``, computed in fp32, returned in ``x``'s dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return y.type_as(x) * self.weight.type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``[T, D/2]`` for RoPE at integer ``positions [T]`` (fp32).

    Frequency ``i`` is ``theta ** (-2i / D)``; computed on the fly (no buffers), so a model built
    on the meta device needs nothing re-initialised for RoPE.
    """
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, T, D]`` by the angles, "rotate-half" layout (Llama / NeoX / OLMo).

    Pairs are ``(x[i], x[i + D/2])``: ``(a, b) -> (a cos - b sin, b cos + a sin)``; fp32 math.
    """
    a, b = x.float().chunk(2, dim=-1)
    out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return out.type_as(x)


class KVCache:
    """Keys and values for incremental decoding: one ``[B, G, max_len, D]`` pair per layer.

    Each layer's buffers are allocated at its first :meth:`update`, with the dtype and device of the
    keys it receives (so the cache follows autocast or a bf16 model). ``length`` is the number of
    positions already stored, i.e. the position of the next token; the model advances it.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int) -> None:
        self.shape = (batch_size, config.kv_heads, max_len, config.head_dim)
        self.keys: list[torch.Tensor | None] = [None] * config.n_layers
        self.values: list[torch.Tensor | None] = [None] * config.n_layers
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v [B, G, T, D]`` after the cached positions; return all ``[B, G, S, D]`` so far."""
        start, stop = self.length, self.length + k.shape[2]
        if stop > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot store up to position {stop}")
        if self.keys[layer] is None:
            self.keys[layer] = k.new_zeros(self.shape)
            self.values[layer] = v.new_zeros(self.shape)
        self.keys[layer][:, :, start:stop] = k
        self.values[layer][:, :, start:stop] = v
        return self.keys[layer][:, :, :stop], self.values[layer][:, :, :stop]


class Attention(nn.Module):
    """Causal multi-head attention with RoPE, optional GQA and QK-norm, no biases.

    ``x [B, T, d] -> [B, T, d]``: ``q = x Wq [B,H,T,D]``, ``k, v = x Wk, x Wv [B,G,T,D]``, optional
    RMSNorm of q and k over ``D`` (one weight ``[D]`` each, shared by heads), RoPE on q and k, then
    ``softmax(q k^T / sqrt(D) + causal mask) v`` via ``scaled_dot_product_attention``, then ``Wo``.
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, hd
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(d, config.n_heads * hd, **kw)
        self.k_proj = nn.Linear(d, config.kv_heads * hd, **kw)
        self.v_proj = nn.Linear(d, config.kv_heads * hd, **kw)
        self.o_proj = nn.Linear(config.n_heads * hd, d, **kw)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.norm_eps, device=device, dtype=dtype)
            self.k_norm = RMSNorm(hd, config.norm_eps, device=device, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = self._attend(q, k, v, past)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
        """SDPA of ``q [B,H,T,D]`` on ``k, v [B,G,S,D]`` where query ``t`` sits at position ``past + t``."""
        T, S = q.shape[2], k.shape[2]
        extra = {}
        if self.n_kv_heads != self.n_heads:
            if _SDPA_HAS_GQA:
                extra["enable_gqa"] = True
            else:  # older torch: materialise the repeated heads
                rep = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if past == 0:  # no cache (or an empty one): the standard causal mask
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)
        if T == 1:  # one new token sees every cached position
            return F.scaled_dot_product_attention(q, k, v, **extra)
        # several new tokens after a cache: query t may see keys 0 .. past + t
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=past)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, **extra)
