"""Functional PolyCom ops: the one place that picks *how* an activation runs.

``impl`` chooses the implementation; the result (and every module's state dict) is the same
whichever is chosen, up to floating-point rounding:

* ``"reference"`` — plain PyTorch (:mod:`polycom.ops.reference`), the specification;
* ``"cpu"`` — fused C++/OpenMP kernels (:mod:`polycom.ops.cpu`), order 3, CPU tensors;
* ``"triton"`` — fused Triton kernels (:mod:`polycom.kernels`), order 3, CUDA tensors;
* ``"auto"`` — the fastest implementation available for the input's device and dtype.

Fast implementations register themselves in :data:`IMPLEMENTATIONS` (see ``register_impl``);
``auto`` tries them in registration order and falls back to the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from polycom.ops import reference
from polycom.ops.reference import DEFAULT_EPS

__all__ = ["IMPLEMENTATIONS", "available_impls", "poly_norm", "poly_relu", "polycom", "register_impl"]


@dataclass(frozen=True)
class Implementation:
    """A way to run PolyNorm / PolyReLU.

    ``supports(x)`` says whether this implementation can run on ``x`` (device, dtype);
    ``poly_norm(x, weight, bias, eps)`` and ``poly_relu(x, weight, bias)`` compute the ops.
    ``auto_dtypes`` (``None``: all) limits which dtypes ``impl="auto"`` sends here; an explicit
    ``impl=name`` may still run any dtype ``supports`` accepts (e.g. float64 for gradcheck).
    """

    name: str
    supports: Callable[[torch.Tensor], bool]
    poly_norm: Callable[..., torch.Tensor]
    poly_relu: Callable[..., torch.Tensor]
    auto_dtypes: tuple[torch.dtype, ...] | None = None


IMPLEMENTATIONS: dict[str, Implementation] = {}


def register_impl(impl: Implementation) -> None:
    """Add (or replace) an implementation; ``auto`` prefers earlier-registered ones."""
    IMPLEMENTATIONS[impl.name] = impl


register_impl(
    Implementation(
        name="reference",
        supports=lambda x: True,
        poly_norm=reference.poly_norm,
        poly_relu=reference.poly_relu,
    )
)


def _register_fused() -> None:
    """The fused kernels (order 3): ``cpu`` (C++/OpenMP) then ``triton`` (GPU), both torch.library ops.

    Nothing is compiled or imported here beyond op definitions: the CPU library is built/loaded on
    the first ``supports`` call and triton is imported on first use. ``auto`` sends them the
    training dtypes only; float64 (a checking dtype) stays on the reference, the specification.
    """
    from functools import partial

    from polycom import kernels
    from polycom.ops import cpu, library

    for name, supports in (("cpu", cpu.supports), ("triton", kernels.supports)):
        register_impl(
            Implementation(
                name=name,
                supports=supports,
                poly_norm=partial(library.poly_norm, name),
                poly_relu=partial(library.poly_relu, name),
                auto_dtypes=(torch.float32, torch.bfloat16, torch.float16),
            )
        )


_register_fused()


def available_impls() -> tuple[str, ...]:
    """Names accepted by ``impl=``: ``"auto"`` plus every registered implementation."""
    return ("auto", *IMPLEMENTATIONS)


def _pick(impl: str, x: torch.Tensor, order: int) -> Implementation:
    if impl == "auto":
        if order != 3:  # fast paths are specialised to the paper's order 3
            return IMPLEMENTATIONS["reference"]
        fast = [
            i
            for i in IMPLEMENTATIONS.values()
            if i.name != "reference" and (i.auto_dtypes is None or x.dtype in i.auto_dtypes) and i.supports(x)
        ]
        return fast[0] if fast else IMPLEMENTATIONS["reference"]
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(available_impls())}")
    chosen = IMPLEMENTATIONS[impl]
    if impl != "reference" and (order != 3 or not chosen.supports(x)):
        raise ValueError(
            f"impl={impl!r} cannot run order {order} on a {x.dtype} tensor on {x.device}; "
            f"use impl='auto' or impl='reference'"
        )
    return chosen


def poly_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = DEFAULT_EPS,
    impl: str = "auto",
) -> torch.Tensor:
    """PolyNorm ``y = sum_j weight[j] * N(x ** (r - j)) + bias``; ``[..., d] -> [..., d]``."""
    reference.check_input(x, weight, bias)
    reference.check_eps(eps)
    return _pick(impl, x, weight.numel()).poly_norm(x, weight, bias, eps)


def poly_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """PolyReLU ``y = sum_j weight[j] * relu(x) ** (r - j) + bias``; ``[..., d] -> [..., d]``."""
    reference.check_input(x, weight, bias)
    return _pick(impl, x, weight.numel()).poly_relu(x, weight, bias)


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
    impl: str = "auto",
) -> torch.Tensor:
    """General PolyCom (see :func:`polycom.ops.reference.polycom`).

    The two paper activations route to their (possibly fused) ops; every other combination
    of ``rho`` / ``composition`` runs the reference.
    """
    if (rho, composition, pre) == ("relu", "type1", "identity"):
        return poly_relu(x, weight, bias, impl=impl)
    if (rho, composition, pre) == ("norm", "type2", "identity"):
        return poly_norm(x, weight, bias, eps=eps, impl=impl)
    if impl not in ("auto", "reference"):
        raise ValueError(
            f"impl={impl!r} has no kernel for rho={rho!r}, composition={composition!r}; "
            "use impl='auto' or impl='reference'"
        )
    return reference.polycom(
        x, weight, bias, rho=rho, composition=composition, pre=pre, eps=eps, prelu_slope=prelu_slope
    )
