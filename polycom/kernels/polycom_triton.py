"""Triton kernels for order-3 PolyNorm and PolyReLU (forward and hand-derived backward).

Same math as the CPU kernels (see ``docs/kernels.md``): every load is upcast to fp32, all
row reductions accumulate in fp32 vectors and are summed once per row, the output is rounded
once to the input's dtype. Rows are processed in chunks of ``BLOCK`` elements (a loop, not one
whole-row block), so any width up to 65536 and beyond runs without register spills.

Weight and bias gradients are deterministic: each backward program writes its own partial sums
into a ``[programs, 4]`` fp32 buffer, which the host adds up with one ``torch.sum``.

Shapes: ``x [..., d]`` is viewed as ``[rows, d]`` (rows may be strided; the last dim is made
contiguous); ``rstd [rows, 3]`` fp32 holds ``1/sqrt(mean(x^(2p)) + eps)`` for p = 3, 2, 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from polycom.ops.cpu import row_stride, rows_view

__all__ = ["poly_norm_backward", "poly_norm_forward", "poly_relu_backward", "poly_relu_forward"]

MAX_BLOCK = 4096


@triton.jit
def _poly_norm_fwd(X, Y, RSTD, COEF, x_stride, d, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * x_stride
    y_row = Y + row * d
    cols = tl.arange(0, BLOCK)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    s4 = tl.zeros([BLOCK], dtype=tl.float32)
    s6 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, d, BLOCK):
        mask = start + cols < d
        v = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        v2 = v * v
        v4 = v2 * v2
        s2 += v2
        s4 += v4
        s6 += v4 * v2
    r3 = 1.0 / tl.sqrt(tl.sum(s6, axis=0) / d + eps)
    r2 = 1.0 / tl.sqrt(tl.sum(s4, axis=0) / d + eps)
    r1 = 1.0 / tl.sqrt(tl.sum(s2, axis=0) / d + eps)
    tl.store(RSTD + row * 3 + 0, r3)
    tl.store(RSTD + row * 3 + 1, r2)
    tl.store(RSTD + row * 3 + 2, r1)
    a3 = tl.load(COEF + 0) * r3
    a2 = tl.load(COEF + 1) * r2
    a1 = tl.load(COEF + 2) * r1
    b = tl.load(COEF + 3)
    for start in range(0, d, BLOCK):
        mask = start + cols < d
        v = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        y = ((a3 * v + a2) * v + a1) * v + b
        tl.store(y_row + start + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _poly_norm_bwd(DY, X, DX, RSTD, COEF, PARTIAL, dy_stride, x_stride, rows, d, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    w0 = tl.load(COEF + 0)
    w1 = tl.load(COEF + 1)
    w2 = tl.load(COEF + 2)
    dw0 = 0.0
    dw1 = 0.0
    dw2 = 0.0
    db = 0.0
    for r in range(pid, rows, programs):
        row = tl.cast(r, tl.int64)
        dy_row = DY + row * dy_stride
        x_row = X + row * x_stride
        s0 = tl.zeros([BLOCK], dtype=tl.float32)
        s1 = tl.zeros([BLOCK], dtype=tl.float32)
        s2 = tl.zeros([BLOCK], dtype=tl.float32)
        s3 = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, d, BLOCK):
            mask = start + cols < d
            g = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            gv = g * v
            gv2 = gv * v
            s0 += g
            s1 += gv
            s2 += gv2
            s3 += gv2 * v
        t0 = tl.sum(s0, axis=0)
        t1 = tl.sum(s1, axis=0)
        t2 = tl.sum(s2, axis=0)
        t3 = tl.sum(s3, axis=0)
        r3 = tl.load(RSTD + row * 3 + 0)
        r2 = tl.load(RSTD + row * 3 + 1)
        r1 = tl.load(RSTD + row * 3 + 2)
        dw0 += r3 * t3
        dw1 += r2 * t2
        dw2 += r1 * t1
        db += t0
        c2 = 3.0 * w0 * r3
        c1 = 2.0 * w1 * r2
        c0 = w2 * r1
        k5 = 3.0 * w0 * r3 * r3 * r3 * t3 / d
        k3 = 2.0 * w1 * r2 * r2 * r2 * t2 / d
        k1 = w2 * r1 * r1 * r1 * t1 / d
        for start in range(0, d, BLOCK):
            mask = start + cols < d
            g = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            v2 = v * v
            dx = g * ((c2 * v + c1) * v + c0) - v * ((k5 * v2 + k3) * v2 + k1)
            tl.store(DX + row * d + start + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(PARTIAL + pid * 4 + 0, dw0)
    tl.store(PARTIAL + pid * 4 + 1, dw1)
    tl.store(PARTIAL + pid * 4 + 2, dw2)
    tl.store(PARTIAL + pid * 4 + 3, db)


@triton.jit
def _poly_relu_fwd(X, Y, COEF, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.where(v <= 0.0, 0.0, v)  # keeps NaN, like torch.relu
    z2 = z * z
    y = ((tl.load(COEF + 0) * (z2 * z) + tl.load(COEF + 1) * z2) + tl.load(COEF + 2) * z) + tl.load(COEF + 3)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _poly_relu_bwd(DY, X, DX, COEF, PARTIAL, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    c2 = 3.0 * tl.load(COEF + 0)
    c1 = 2.0 * tl.load(COEF + 1)
    c0 = tl.load(COEF + 2)
    s0 = tl.zeros([BLOCK], dtype=tl.float32)
    s1 = tl.zeros([BLOCK], dtype=tl.float32)
    s2 = tl.zeros([BLOCK], dtype=tl.float32)
    s3 = tl.zeros([BLOCK], dtype=tl.float32)
    for block in range(pid, tl.cdiv(n, BLOCK), programs):
        offs = tl.cast(block, tl.int64) * BLOCK + cols
        mask = offs < n
        g = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        z = tl.where(v <= 0.0, 0.0, v)
        gz = g * z
        gz2 = gz * z
        s0 += g
        s1 += gz
        s2 += gz2
        s3 += gz2 * z
        # torch's relu backward passes the gradient unless x <= 0 (NaN inputs give NaN)
        dx = tl.where(v <= 0.0, 0.0, g * ((c2 * z + c1) * z + c0))
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(PARTIAL + pid * 4 + 0, tl.sum(s3, axis=0))
    tl.store(PARTIAL + pid * 4 + 1, tl.sum(s2, axis=0))
    tl.store(PARTIAL + pid * 4 + 2, tl.sum(s1, axis=0))
    tl.store(PARTIAL + pid * 4 + 3, tl.sum(s0, axis=0))


def _block(d: int) -> int:
    return min(triton.next_power_of_2(max(d, 16)), MAX_BLOCK)


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _programs(x: torch.Tensor, work_items: int) -> int:
    """Persistent-program count for the backward: a few per SM (4 in the CPU interpreter)."""
    if x.device.type == "cuda":
        per_device = torch.cuda.get_device_properties(x.device).multi_processor_count * 4
    else:
        per_device = 4
    return max(1, min(work_items, per_device))


def _coefficients(weight: torch.Tensor, bias: torch.Tensor, device) -> torch.Tensor:
    return torch.cat([weight.detach().reshape(-1), bias.detach().reshape(-1)]).to(device, torch.float32)


def _grads(weight, bias, partial: torch.Tensor):
    out = partial.sum(dim=0)
    return out[:3].to(weight.dtype), out[3:].to(bias.dtype).reshape(bias.shape)


def poly_norm_forward(x, weight, bias, eps: float):
    """PolyNorm forward: ``x [..., d] -> (y [..., d] in x.dtype, rstd [rows, 3] fp32)``."""
    d = x.shape[-1]
    x2 = rows_view(x)
    rows = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(rows, 3, dtype=torch.float32, device=x.device)
    if rows == 0 or d == 0:
        return y, rstd.fill_(float("nan") if d == 0 else 0.0)
    block = _block(d)
    coef = _coefficients(weight, bias, x.device)
    _poly_norm_fwd[(rows,)](
        x2, y, rstd, coef, row_stride(x2), d, float(eps), BLOCK=block, num_warps=_warps(block)
    )
    return y, rstd


def poly_norm_backward(dy, x, weight, bias, rstd):
    """PolyNorm backward from ``x`` and ``rstd``: ``(dx, dweight [3], dbias [1])``."""
    d = x.shape[-1]
    x2, g2 = rows_view(x), rows_view(dy.to(x.dtype))
    rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0 or d == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(bias)
    programs = _programs(x, rows)
    partial = torch.empty(programs, 4, dtype=torch.float32, device=x.device)
    block = _block(d)
    coef = _coefficients(weight, bias, x.device)
    _poly_norm_bwd[(programs,)](
        g2, x2, dx, rstd.contiguous(), coef, partial, row_stride(g2), row_stride(x2), rows, d,
        BLOCK=block, num_warps=_warps(block),
    )  # fmt: skip
    return (dx, *_grads(weight, bias, partial))


def poly_relu_forward(x, weight, bias):
    """PolyReLU forward: ``x [..., d] -> y [..., d]`` (element-wise over a contiguous copy of x)."""
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = xc.numel()
    if n > 0:
        block = 1024
        _poly_relu_fwd[(triton.cdiv(n, block),)](xc, y, _coefficients(weight, bias, x.device), n, BLOCK=block)
    return y


def poly_relu_backward(dy, x, weight, bias):
    """PolyReLU backward from ``x``: ``(dx, dweight [3], dbias [1])``."""
    xc, gc = x.contiguous(), dy.to(x.dtype).contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = xc.numel()
    if n == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(bias)
    block = 1024
    programs = _programs(x, triton.cdiv(n, block))
    partial = torch.empty(programs, 4, dtype=torch.float32, device=x.device)
    coef = _coefficients(weight, bias, x.device)
    _poly_relu_bwd[(programs,)](gc, xc, dx, coef, partial, n, BLOCK=block)
    return (dx, *_grads(weight, bias, partial))
