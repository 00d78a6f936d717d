"""The fused PolyNorm / PolyReLU kernels as ``torch.library`` custom ops with autograd.

Each backend (``cpu``: :mod:`polycom.ops.cpu`; ``triton``: :mod:`polycom.kernels`) gets four ops
in the ``polycom`` namespace, e.g. ``polycom::poly_norm_cpu`` (forward, returns ``y`` and the
per-row ``rstd``) and ``polycom::poly_norm_cpu_backward``. Each has a fake (meta) implementation,
so ``torch.compile`` traces through it without a graph break, and takes and returns plain
tensors, so FSDP2 / DTensor-free code paths just work. Autograd is registered on the forward op
and saves only ``x`` (as given), the 3-element ``weight`` and, for PolyNorm, ``rstd [rows, 3]``.

Public entry points (what :mod:`polycom.functional` registers):
``poly_norm(backend, x, weight, bias, eps) -> y`` and ``poly_relu(backend, x, weight, bias) -> y``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BACKENDS", "poly_norm", "poly_relu"]


@dataclass(frozen=True)
class _Ops:
    """The two autograd-enabled forward ops of one backend."""

    poly_norm: Callable[..., tuple[Tensor, Tensor]]
    poly_relu: Callable[..., Tensor]


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


# One library object per process holds every definition; FRAGMENT lets other code add to the namespace.
_LIB = torch.library.Library("polycom", "FRAGMENT")


def _op(name: str, schema: str, kernel: Callable, fake: Callable):
    """Define ``polycom::<name>`` with ``kernel`` for every backend key and ``fake`` for tracing.

    The low-level ``Library.define`` / ``impl`` are used rather than ``torch.library.custom_op``
    because the latter imports torch._dynamo on the first eager call (about 1 s, twice the
    budget for a first call in a fresh process). The result is the same kind of op.
    """
    _LIB.define(f"{name}{schema}")
    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"polycom::{name}", fake, lib=_LIB)
    return getattr(torch.ops.polycom, name).default


def _define(backend: str, kernels) -> _Ops:
    """Define ``polycom::poly_{norm,relu}_<backend>[_backward]`` on top of ``kernels``.

    ``kernels`` provides ``poly_norm_forward(x, w, b, eps) -> (y, rstd)``,
    ``poly_norm_backward(dy, x, w, b, rstd) -> (dx, dw, db)``, ``poly_relu_forward(x, w, b) -> y``
    and ``poly_relu_backward(dy, x, w, b) -> (dx, dw, db)``.
    """
    grads = "-> (Tensor, Tensor, Tensor)"

    def grads_fake(dy, x, weight, bias, *rest):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)

    norm_fwd = _op(
        f"poly_norm_{backend}",
        "(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor)",
        lambda x, weight, bias, eps: kernels.poly_norm_forward(x, weight, bias, eps),
        lambda x, weight, bias, eps: (
            x.new_empty(x.shape),
            x.new_empty((_rows(x), 3), dtype=_stats_dtype(x.dtype)),
        ),
    )
    norm_bwd = _op(
        f"poly_norm_{backend}_backward",
        f"(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor rstd) {grads}",
        lambda dy, x, weight, bias, rstd: kernels.poly_norm_backward(dy, x, weight, bias, rstd),
        grads_fake,
    )

    def norm_setup(ctx, inputs, output):
        x, weight, bias, _ = inputs
        ctx.save_for_backward(x, weight, bias, output[1])

    def norm_backward(ctx, dy, _drstd):
        x, weight, bias, rstd = ctx.saved_tensors
        dx, dw, db = norm_bwd(dy, x, weight, bias, rstd)
        return dx, dw, db, None

    torch.library.register_autograd(
        f"polycom::poly_norm_{backend}", norm_backward, setup_context=norm_setup, lib=_LIB
    )

    relu_fwd = _op(
        f"poly_relu_{backend}",
        "(Tensor x, Tensor weight, Tensor bias) -> Tensor",
        lambda x, weight, bias: kernels.poly_relu_forward(x, weight, bias),
        lambda x, weight, bias: x.new_empty(x.shape),
    )
    relu_bwd = _op(
        f"poly_relu_{backend}_backward",
        f"(Tensor dy, Tensor x, Tensor weight, Tensor bias) {grads}",
        lambda dy, x, weight, bias: kernels.poly_relu_backward(dy, x, weight, bias),
        grads_fake,
    )

    def relu_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def relu_backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        return relu_bwd(dy, x, weight, bias)

    torch.library.register_autograd(
        f"polycom::poly_relu_{backend}", relu_backward, setup_context=relu_setup, lib=_LIB
    )
    return _Ops(poly_norm=norm_fwd, poly_relu=relu_fwd)


class _TritonKernels:
    """Imports :mod:`polycom.kernels` (and so triton) on first use, not when this module loads."""

    def __getattr__(self, name: str):
        from polycom.kernels import polycom_triton

        return getattr(polycom_triton, name)


def _cpu_kernels():
    from polycom.ops import cpu

    return cpu


BACKENDS: dict[str, _Ops] = {
    "cpu": _define("cpu", _cpu_kernels()),
    "triton": _define("triton", _TritonKernels()),
}


def poly_norm(backend: str, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """PolyNorm (order 3) through ``backend``'s custom op; ``[..., d] -> [..., d]`` in x.dtype."""
    return BACKENDS[backend].poly_norm(x, weight, bias, float(eps))[0]


def poly_relu(backend: str, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """PolyReLU (order 3) through ``backend``'s custom op; ``[..., d] -> [..., d]`` in x.dtype."""
    return BACKENDS[backend].poly_relu(x, weight, bias)
