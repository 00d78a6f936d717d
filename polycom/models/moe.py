"""OLMoE-style mixture-of-experts MLP: linear router, top-k of E experts, dropless grouped computation.

Per token ``x [d]``: router logits ``l = W_r x [E]`` (fp32), probabilities ``p = softmax(l)``, the k
largest ``p_e`` choose the experts and are the gates ``g`` (renormalised to sum to 1 over the k when
``normalize_gates``). Output ``y = sum_{e in topk} g_e * down_e(act(up_e(x)))``.

Dropless: the ``N * k`` token-to-expert assignments are sorted by expert id, every expert runs on its
whole contiguous group (batched matmuls, no capacity, no token dropped), and the results are scattered
back with the gates. Expert weights are stacked parameters ``w_up [E, d, up_features(h)]`` and
``w_down [E, h, d]``.

Auxiliary losses (returned, weighted by the model):

* load balancing (Switch Transformer, extended to top-k): ``lb = E * sum_e f_e * P_e`` with
  ``f_e = (number of the N*k assignments routed to e) / (N*k)`` and ``P_e = mean_n p_{n,e}``;
  ``lb = 1`` for perfectly uniform routing and ``E`` when every token goes to one expert (k = 1);
* router z-loss (ST-MoE): ``z = mean_n logsumexp(l_n)^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polycom.activations import build_activation, get_activation_spec
from polycom.models.config import ModelConfig

__all__ = ["MoE", "RouterLosses", "load_balancing_loss", "route", "router_z_loss"]


@dataclass
class RouterLosses:
    """Unweighted auxiliary losses of one MoE layer (0-d fp32 tensors, differentiable)."""

    lb_loss: torch.Tensor
    z_loss: torch.Tensor


def route(
    logits: torch.Tensor, top_k: int, normalize_gates: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits [N, E] -> (probs [N, E], gates [N, k], experts [N, k])``; gates are the top-k probs."""
    probs = logits.softmax(dim=-1)
    gates, experts = probs.topk(top_k, dim=-1)
    if normalize_gates:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return probs, gates, experts


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``E * sum_e f_e * P_e`` for ``probs [N, E]`` and chosen ``experts [N, k]`` (see module doc)."""
    num_experts = probs.shape[-1]
    counts = torch.bincount(experts.flatten(), minlength=num_experts)
    fraction_routed = counts.to(probs.dtype) / experts.numel()
    mean_prob = probs.mean(dim=0)
    return num_experts * (fraction_routed * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """``mean_n logsumexp(logits_n)^2`` for ``logits [N, E]``."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's when it is on for ``x``'s device, else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _grouped_mm_usable(x: torch.Tensor, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` has a fast kernel here: CUDA sm90+, bf16, 16-byte aligned rows."""
    if not (hasattr(torch, "_grouped_mm") and x.is_cuda and _compute_dtype(x) == torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(x.device) >= (9, 0) and all(w % 8 == 0 for w in widths)


class MoE(nn.Module):
    """Dropless top-k mixture of experts; ``x [B, T, d] -> (y [B, T, d], RouterLosses)``.

    The expert activation comes from the registry. PolyCom coefficients are one module ``act``
    shared by all experts of the layer (``coefficients="shared"``, the paper's choice) or a
    ``ModuleList`` ``act[e]`` with one per expert (``"per_expert"``). PolyNorm normalises each
    token's full expert hidden vector (row-wise), exactly as in a dense MLP.
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        assert config.moe is not None, "MoE needs config.moe"
        moe = config.moe
        spec = get_activation_spec(config.activation)
        d, hidden = config.d_model, config.ffn_hidden_width
        self.num_experts, self.top_k, self.normalize_gates = moe.num_experts, moe.top_k, moe.normalize_gates
        self.expert_impl = moe.expert_impl
        self.router = nn.Linear(d, moe.num_experts, bias=False, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.w_up = nn.Parameter(torch.empty(moe.num_experts, d, spec.up_features(hidden), **factory))
        self.w_down = nn.Parameter(torch.empty(moe.num_experts, hidden, d, **factory))
        self.per_expert_act = moe.coefficients == "per_expert" and spec.has_parameters
        build = lambda: build_activation(config.activation, **factory, **config.activation_kwargs)
        self.act = nn.ModuleList(build() for _ in range(moe.num_experts)) if self.per_expert_act else build()

    def expert_parameters(self) -> list[nn.Parameter]:
        """Parameters of which each token uses only its k experts' share (for active-parameter counts)."""
        params = [self.w_up, self.w_down]
        if self.per_expert_act:
            params += list(self.act.parameters())
        return params

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterLosses]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, d]
        with torch.autocast(x.device.type, enabled=False):  # the router runs in fp32 even under autocast
            logits = F.linear(x.float(), self.router.weight.float())  # [N, E]
        probs, gates, experts = route(logits, self.top_k, self.normalize_gates)
        losses = RouterLosses(load_balancing_loss(probs, experts), router_z_loss(logits))

        flat_experts = experts.flatten()  # assignment a = n * k + j goes to expert flat_experts[a]
        order = flat_experts.argsort(stable=True)  # group assignments by expert
        token_of = order // self.top_k  # [N*k] the token of each sorted assignment
        counts = torch.bincount(flat_experts, minlength=self.num_experts)  # [E] group sizes
        y_sorted = self._run_experts(x[token_of], counts)  # [N*k, d]
        y_sorted = y_sorted * gates.flatten()[order].unsqueeze(-1).to(y_sorted.dtype)
        out = y_sorted.new_zeros(x.shape).index_add_(0, token_of, y_sorted)  # sum each token's k experts
        return out.reshape(shape), losses

    def _run_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x_sorted [N*k, d]`` grouped by expert (group sizes ``counts [E]``) -> expert outputs."""
        impl = self.expert_impl
        if impl == "auto":
            usable = _grouped_mm_usable(
                x_sorted, x_sorted.shape[-1], self.w_up.shape[-1], self.w_down.shape[1]
            )
            impl = "grouped_mm" if usable else "loop"
        if impl == "grouped_mm":
            return self._experts_grouped_mm(x_sorted, counts)
        return self._experts_loop(x_sorted, counts)

    def _act(self, h: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
        """Apply the activation row-wise; per-expert coefficients need the group ``sizes``."""
        if not self.per_expert_act:
            return self.act(h)
        return torch.cat([act(h_e) for act, h_e in zip(self.act, h.split(sizes), strict=True)])

    def _experts_loop(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One matmul pair per expert on its contiguous group (a loop over E experts, not over tokens)."""
        # unbind once: indexing w_up[e] per expert would make backward build E full-size zero gradients
        w_up, w_down = self.w_up.unbind(0), self.w_down.unbind(0)
        outputs = []
        for e, x_e in enumerate(x_sorted.split(counts.tolist())):
            if x_e.shape[0] == 0:
                continue
            h = x_e @ w_up[e]
            h = self.act[e](h) if self.per_expert_act else self.act(h)
            outputs.append(h @ w_down[e])
        return torch.cat(outputs)

    def _experts_grouped_mm(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All experts in two ``torch._grouped_mm`` calls (``offs`` = cumulative group ends)."""
        dtype = _compute_dtype(x_sorted)  # autocast does not cover _grouped_mm: cast as it would
        offsets = counts.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x_sorted.to(dtype), self.w_up.to(dtype), offs=offsets)
        h = self._act(h, counts.tolist() if self.per_expert_act else None)
        return torch._grouped_mm(h.to(dtype), self.w_down.to(dtype), offs=offsets)
