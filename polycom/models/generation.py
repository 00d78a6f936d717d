"""Autoregressive generation with a KV cache: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import torch

from polycom.models.layers import KVCache

__all__ = ["filter_logits", "generate", "next_token"]


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to ``-inf`` every logit of ``[B, V]`` outside the top-k and outside the nucleus of mass ``top_p``.

    The nucleus keeps the smallest set of most probable tokens whose probability sum reaches ``top_p``
    (the most probable token is always kept).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``logits [B, V] -> tokens [B, 1]``: argmax when ``temperature == 0``, else a filtered sample."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def _check_options(max_new_tokens, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


@torch.no_grad()
def generate(
    model,
    tokens: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """``tokens [B, T] -> [B, T + max_new_tokens]``.

    With ``use_cache`` the prompt is run once into a :class:`KVCache` and each step feeds only the
    newest token; without it every step recomputes the whole sequence (the reference the cached path
    is tested against). The total length may not exceed ``model.config.max_seq_len``.
    """
    _check_options(max_new_tokens, temperature, top_k, top_p)
    total = tokens.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"max_seq_len={model.config.max_seq_len}"
        )
    if max_new_tokens == 0:
        return tokens
    cache = KVCache(model.config, tokens.shape[0], total) if use_cache else None
    out, step_input = tokens, tokens
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache).logits[:, -1]
        new = next_token(logits, temperature, top_k, top_p, generator)
        out = torch.cat([out, new], dim=1)
        step_input = new if use_cache else out
    return out
