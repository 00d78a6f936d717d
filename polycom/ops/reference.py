"""The PolyCom activations in plain PyTorch: this module *is* the specification.

Every fast implementation (fused CPU, Triton) is tested against these functions, and these
functions are tested against an independent float64 re-derivation and ``gradcheck``.

Notation (one row = one token's FFN intermediate vector ``x`` of width ``d``; all ops are
row-wise over the last dimension, any leading shape ``[..., d]``):

* order ``r >= 1``; coefficients ``weight`` of shape ``[r]`` and ``bias`` of shape ``[1]``.
  As in the official code, ``weight[0]`` multiplies the *highest* power:
  ``weight[j]`` pairs with power ``r - j``.
* ``N(u) = u / sqrt(mean(u**2, -1) + eps)`` — RMS normalisation without gain (official code,
  ``eps = 1e-6``); the paper writes ``u / ||u||_2``, available as the ``l2norm`` rho.

The three activations:

* PolyReLU (type I, rho = ReLU):   ``y = sum_j weight[j] * relu(x) ** (r - j) + bias``
* PolyNorm (type II, rho = N):     ``y = sum_j weight[j] * N(x ** (r - j)) + bias``
* PolyCom, general:
    - type I  ("rho then powers"): ``y = sum_j weight[j] * rho(x) ** (r - j) + bias``
    - type II ("powers then rho"): ``y = sum_j weight[j] * rho(pre(x) ** (r - j)) + bias``
  where ``pre`` is the identity except for PolyReLUNorm (``pre = relu``, ``rho = N``).

Precision: half-precision inputs (fp16, bf16) and fp32 are computed in fp32 (powers, means,
coefficients), float64 in float64; the result is returned in the input dtype. This keeps
PolyNorm finite for fp16 inputs up to |x| = 65504 (x**6 <= 8e28 fits fp32).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "COMPOSITIONS",
    "DEFAULT_EPS",
    "FLOAT_DTYPES",
    "RHO_FUNCTIONS",
    "compute_dtype",
    "l2_normalize",
    "poly_norm",
    "poly_relu",
    "polycom",
    "rms_normalize",
]

DEFAULT_EPS = 1e-6
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
COMPOSITIONS = ("type1", "type2")


def rms_normalize(u: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``N(u) = u * rsqrt(mean(u**2, dim=-1) + eps)``; shape ``[..., d] -> [..., d]``."""
    return u * torch.rsqrt((u**2).mean(dim=-1, keepdim=True) + eps)


def l2_normalize(u: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The paper's written form ``u / ||u||_2`` (eps under the root, like ``N``).

    Equals ``rms_normalize(u) / sqrt(d)`` up to eps, so at the same coefficients each term is
    ``sqrt(d)`` times smaller than in the official code.
    """
    return u * torch.rsqrt((u**2).sum(dim=-1, keepdim=True) + eps)


def _prelu(u: torch.Tensor, slope: torch.Tensor | None) -> torch.Tensor:
    """``max(u, 0) + slope * min(u, 0)``; ``slope`` is a learnable scalar (default 0.25)."""
    if slope is None:
        slope = torch.tensor(0.25, dtype=u.dtype, device=u.device)
    return torch.where(u >= 0, u, slope.to(u.dtype) * u)


def _elementwise(fn: Callable[[torch.Tensor], torch.Tensor]):
    return lambda u, eps, slope: fn(u)


# name -> rho(u, eps, prelu_slope); every rho maps [..., d] -> [..., d].
RHO_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "relu": _elementwise(torch.relu),
    "norm": lambda u, eps, slope: rms_normalize(u, eps),
    "l2norm": lambda u, eps, slope: l2_normalize(u, eps),
    "prelu": lambda u, eps, slope: _prelu(u, slope),
    "sigmoid": _elementwise(torch.sigmoid),
    "silu": _elementwise(F.silu),
    "tanh": _elementwise(torch.tanh),
    "gelu": _elementwise(F.gelu),
    "identity": _elementwise(lambda u: u),
}
PRE_FUNCTIONS = ("identity", "relu")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 stays float64, everything else runs in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the bad value for inputs no PolyCom op accepts."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"x has dtype {x.dtype}; PolyCom activations accept floating inputs only: "
            f"{', '.join(str(d) for d in FLOAT_DTYPES)}"
        )
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the feature dimension), got a 0-d tensor")
    if weight.dim() != 1 or weight.numel() < 1:
        raise ValueError(f"weight must have shape [r] with r >= 1, got shape {list(weight.shape)}")
    if bias.numel() != 1:
        raise ValueError(f"bias must have exactly one element (shape [1]), got shape {list(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; expected one of {FLOAT_DTYPES}")


def check_eps(eps: float) -> None:
    """Raise ``ValueError`` unless ``eps`` is a finite number >= 0."""
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def check_composition(rho: str, composition: str, pre: str) -> None:
    """Raise ``ValueError`` naming the bad value unless (rho, composition, pre) is a valid PolyCom."""
    if rho not in RHO_FUNCTIONS:
        raise ValueError(f"unknown rho {rho!r}; valid: {', '.join(RHO_FUNCTIONS)}")
    if composition not in COMPOSITIONS:
        raise ValueError(f"unknown composition {composition!r}; valid: {', '.join(COMPOSITIONS)}")
    if pre not in PRE_FUNCTIONS:
        raise ValueError(f"unknown pre {pre!r}; valid: {', '.join(PRE_FUNCTIONS)}")
    if pre != "identity" and composition != "type2":
        raise ValueError(f"pre={pre!r} applies to composition='type2' only, got {composition!r}")


def _polynomial(terms: Callable[[int], torch.Tensor], weight: torch.Tensor, bias: torch.Tensor):
    """``weight[0]*terms(r) + weight[1]*terms(r-1) + ... + bias`` with ``r = len(weight)``.

    Summed in the official code's order (highest power first, bias last) so that fp32 results
    match the official modules bit for bit.
    """
    order = weight.numel()
    y = weight[0] * terms(order)
    for j in range(1, order):
        y = y + weight[j] * terms(order - j)
    return y + bias


def _powers(base: torch.Tensor, max_power: int) -> list[torch.Tensor]:
    """``[base**1, ..., base**max_power]`` (index 0 is power 1), as ``**`` like the official code."""
    return [base] + [base**p for p in range(2, max_power + 1)]


def polycom(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    rho: str = "relu",
    composition: str = "type1",
    pre: str = "identity",
    eps: float = DEFAULT_EPS,
    prelu_slope: torch.Tensor | None = None,
) -> torch.Tensor:
    """General PolyCom of order ``r = len(weight)``; ``x: [..., d] -> [..., d]`` (x's dtype).

    * ``composition="type1"``: ``y = sum_j weight[j] * rho(x) ** (r - j) + bias``
    * ``composition="type2"``: ``y = sum_j weight[j] * rho(pre(x) ** (r - j)) + bias``

    ``rho`` is one of :data:`RHO_FUNCTIONS`; ``pre`` ("identity" or "relu") is only meaningful
    for type II (PolyReLUNorm is type II with ``pre="relu"``, ``rho="norm"``).
    """
    check_input(x, weight, bias)
    check_composition(rho, composition, pre)
    check_eps(eps)
    ct = compute_dtype(x.dtype)
    xc, w, b = x.to(ct), weight.to(ct), bias.to(ct)
    slope = None if prelu_slope is None else prelu_slope.to(ct)
    rho_fn = RHO_FUNCTIONS[rho]
    order = weight.numel()
    if composition == "type1":
        powers = _powers(rho_fn(xc, eps, slope), order)
        y = _polynomial(lambda p: powers[p - 1], w, b)
    else:
        base = torch.relu(xc) if pre == "relu" else xc
        powers = _powers(base, order)
        y = _polynomial(lambda p: rho_fn(powers[p - 1], eps, slope), w, b)
    return y.to(x.dtype)


def poly_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """PolyReLU: ``y = sum_j weight[j] * relu(x) ** (r - j) + bias``; ``[..., d] -> [..., d]``."""
    return polycom(x, weight, bias, rho="relu", composition="type1")


def poly_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """PolyNorm: ``y = sum_j weight[j] * N(x ** (r - j)) + bias``, ``N`` = RMS norm over the last dim.

    Official (r = 3): ``y = w0*N(x^3) + w1*N(x^2) + w2*N(x) + b``; ``[..., d] -> [..., d]``.
    """
    return polycom(x, weight, bias, rho="norm", composition="type2", eps=eps)
