"""The decoder-only transformer (Llama style), dense or MoE, with honest parameter counts.

``Transformer(config)(tokens [B, T]) -> ModelOutput(logits [B, T, V], aux_loss [], metrics)``.
Block: ``x = x + attn(attn_norm(x)); x = x + mlp(mlp_norm(x))`` (pre-norm), final RMSNorm, then the
output head (untied ``lm_head`` or the embedding matrix when tied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from polycom.activations import iter_polycom_modules
from polycom.models.config import ModelConfig
from polycom.models.layers import Attention, KVCache, RMSNorm, rope_angles
from polycom.models.mlp import MLP
from polycom.models.moe import MoE, RouterLosses

__all__ = ["Block", "ModelOutput", "Transformer", "count_params"]

EMBEDDING_PARAMS = ("embed.weight", "lm_head.weight")
OUTPUT_PROJECTIONS = ("attn.o_proj.weight", "mlp.down_proj.weight", "mlp.w_down")
"""Parameters whose init std the dense recipe divides by sqrt(2L) (they write into the residual stream)."""


@dataclass
class ModelOutput:
    """What the model returns for ``tokens [B, T]``.

    ``logits [B, T, V]``; ``aux_loss``: 0-d tensor, the weighted MoE losses to add to the training
    loss (0 for dense models); ``metrics``: the unweighted ``{"lb_loss", "z_loss"}`` as floats (empty
    for dense). The metrics are kept as detached tensors and turned into floats only when read, so
    the forward pass never waits for the device (and ``torch.compile`` sees no ``.item()``).
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor
    metric_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.metric_tensors.items()}


class Block(nn.Module):
    """Pre-norm transformer block; the MLP is dense (:class:`MLP`) or a mixture of experts (:class:`MoE`)."""

    def __init__(self, config: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, device=device, dtype=dtype)
        self.attn = Attention(config, device=device, dtype=dtype)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, device=device, dtype=dtype)
        self.mlp = (MoE if config.moe is not None else MLP)(config, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, rope, cache: KVCache | None = None, layer: int = 0
    ) -> tuple[torch.Tensor, RouterLosses | None]:
        x = x + self.attn(self.attn_norm(x), rope, cache, layer)
        out = self.mlp(self.mlp_norm(x))
        if isinstance(out, tuple):
            out, losses = out
            return x + out, losses
        return x + out, None


class Transformer(nn.Module):
    """Decoder-only LM. ``model(tokens)`` -> :class:`ModelOutput`; see the module docstring.

    Built on the current default device (``with torch.device("meta"): Transformer(cfg)`` allocates
    nothing); :meth:`init_weights` re-initialises every parameter per ``config.init``, so a meta model
    can be ``to_empty(device=...)`` and then initialised.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ValueError(f"Transformer needs a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = (
            None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        self.init_weights()

    # ----------------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_weights(self) -> None:
        """Re-initialise all parameters per ``config.init``.

        ``"dense"`` (small init): every linear / embedding weight ~ N(0, sqrt(2 / (5 d))), output
        projections (attention ``o_proj``, MLP ``down_proj`` / expert ``w_down``) divided by sqrt(2 L).
        ``"moe"``: every such weight ~ N(0, 0.02) truncated at 3 sigma. RMSNorm weights are 1; PolyCom
        coefficients get their own init (``1/r``, bias 0).
        """
        cfg = self.config
        if cfg.init == "dense":
            std = math.sqrt(2.0 / (5.0 * cfg.d_model))
            out_std = std / math.sqrt(2.0 * cfg.n_layers)
            draw = lambda t, s: nn.init.normal_(t, mean=0.0, std=s)
        else:
            std = out_std = 0.02
            draw = lambda t, s: nn.init.trunc_normal_(t, mean=0.0, std=s, a=-3 * s, b=3 * s)
        own_init = [m for m in self.modules() if isinstance(m, RMSNorm)]
        own_init += [m for _, m in iter_polycom_modules(self)]
        skip = set()
        for module in own_init:  # norm gains -> 1, PolyCom coefficients -> 1/r and 0
            module.reset_parameters()
            skip.update(id(p) for p in module.parameters())
        for name, param in self.named_parameters():
            if id(param) not in skip:
                draw(param, out_std if name.endswith(OUTPUT_PROJECTIONS) else std)

    # ----------------------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> ModelOutput:
        """``tokens [B, T]`` (int) -> :class:`ModelOutput`; with ``cache``, they follow its positions."""
        past = 0 if cache is None else cache.length
        self._check_tokens(tokens, past)
        positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)
        rope = rope_angles(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed(tokens)
        router_losses: list[RouterLosses] = []
        for i, block in enumerate(self.layers):
            x, losses = block(x, rope, cache, i)
            if losses is not None:
                router_losses.append(losses)
        if cache is not None:
            cache.length += tokens.shape[1]
        x = self.norm(x)
        logits = nn.functional.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        return self._output(logits, router_losses)

    def _check_tokens(self, tokens: torch.Tensor, past: int) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor [batch, seq], got {got}")
        if past + tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {past + tokens.shape[1]} positions exceeds "
                f"max_seq_len={self.config.max_seq_len}"
            )

    def _output(self, logits: torch.Tensor, router_losses: list[RouterLosses]) -> ModelOutput:
        """Average the per-layer router losses and weight them into ``aux_loss``."""
        if not router_losses:
            return ModelOutput(logits, torch.zeros((), device=logits.device))
        lb = torch.stack([r.lb_loss for r in router_losses]).mean()
        z = torch.stack([r.z_loss for r in router_losses]).mean()
        moe = self.config.moe
        aux = moe.lb_loss_weight * lb + moe.z_loss_weight * z
        return ModelOutput(logits, aux, {"lb_loss": lb.detach(), "z_loss": z.detach()})

    # ----------------------------------------------------------------------------- generation
    def generate(
        self,
        tokens: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue ``tokens [B, T]`` by ``max_new_tokens`` new tokens; see ``generation.generate``."""
        from polycom.models.generation import generate

        return generate(self, tokens, max_new_tokens, temperature, top_k, top_p, generator, use_cache)

    # ----------------------------------------------------------------------------- accounting
    def num_params(self, non_embedding: bool = False, active: bool = False) -> int:
        """Parameter count of this config, computed on a meta-device copy (see :func:`count_params`)."""
        return count_params(self.config, non_embedding=non_embedding, active=active)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: ``6 * N + 12 * L * d * T`` (forward + backward).

        ``N`` = active non-embedding parameters plus the output head (a matmul even when tied);
        ``12 L d T`` is the attention score/value term at context ``T`` (default ``max_seq_len``),
        counted without the causal halving (the PaLM convention).
        """
        cfg = self.config
        seq_len = cfg.max_seq_len if seq_len is None else seq_len
        n = self.num_params(non_embedding=True, active=True) + cfg.vocab_size * cfg.d_model
        return float(6 * n + 12 * cfg.n_layers * cfg.d_model * seq_len)


def count_params(config: ModelConfig, non_embedding: bool = False, active: bool = False) -> int:
    """Parameters of ``Transformer(config)``, built on the meta device (nothing is allocated).

    ``non_embedding`` drops the token embedding and the untied output head. ``active`` counts what
    one token uses: for MoE layers only ``top_k / num_experts`` of the expert parameters (the router
    and everything else count fully); equal to the total for dense models.
    """
    with torch.device("meta"):
        model = Transformer(config)
    expert_ids = set()
    if active and config.moe is not None:
        expert_ids = {id(p) for m in model.modules() if isinstance(m, MoE) for p in m.expert_parameters()}
    shared = experts = 0
    for name, param in model.named_parameters():
        if non_embedding and name in EMBEDDING_PARAMS:
            continue
        if id(param) in expert_ids:
            experts += param.numel()
        else:
            shared += param.numel()
    if expert_ids:  # every expert has the same parameters, so E divides the expert total exactly
        experts = experts * config.moe.top_k // config.moe.num_experts
    return shared + experts
