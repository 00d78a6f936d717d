"""A rough per-device memory estimate for ``polycom train --dry-run`` (no tensors are allocated).

- weights + gradients + AdamW moments: ``(4 + 4 + 8) N`` bytes for fp32 master weights, divided by
  the world size under FSDP (sharded), not under DDP;
- activations kept for backward, per micro-batch of ``b`` sequences of ``T`` tokens:
  ``b T L (18 d + 4 f) s`` (``d`` = model width, ``f`` = MLP up-projection outputs per token counting
  ``top_k`` experts, ``s`` = 2 bytes under bf16 autocast else 4) -- a rule of thumb for a pre-norm
  block with fused attention (no ``T x T`` scores stored);
- logits and their gradient in fp32: ``2 b T V 4`` bytes.
"""

from __future__ import annotations

from polycom.activations import get_activation_spec


def estimate_memory(config, world_size: int, parallel: str, bf16: bool) -> dict[str, float]:
    """``{"params_optimizer": bytes, "activations": bytes, "logits": bytes, "total": bytes}`` per device."""
    from polycom.models import count_params

    model = config.model
    n = count_params(model)
    state = 16 * n / (world_size if parallel == "fsdp" else 1)
    micro = config.data.batch_size // (world_size * config.data.grad_accum)
    tokens = micro * config.data.seq_len
    spec = get_activation_spec(model.activation)
    up = spec.up_features(model.ffn_hidden_width) * (model.moe.top_k if model.moe else 1)
    act = tokens * model.n_layers * (18 * model.d_model + 4 * up) * (2 if bf16 else 4)
    logits = 2 * tokens * model.vocab_size * 4
    return {"params_optimizer": state, "activations": act, "logits": logits, "total": state + act + logits}


def format_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
