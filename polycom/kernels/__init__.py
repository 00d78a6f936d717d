"""Triton GPU kernels for PolyNorm / PolyReLU (order 3), imported lazily.

``import polycom.kernels`` never imports triton; :func:`supports` does, on first call. The
kernels live in :mod:`polycom.kernels.polycom_triton`. With ``TRITON_INTERPRET=1`` set before
triton is first imported, they also run on CPU tensors (slowly: for tests on small shapes).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["SUPPORTED_DTYPES", "interpreting", "supports", "triton_available"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_available() -> bool:
    """True when triton imports (checked once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supports(x: torch.Tensor) -> bool:
    """CUDA tensors of fp32 / fp16 / bf16 (CPU tensors too under ``TRITON_INTERPRET=1``)."""
    if x.dtype not in SUPPORTED_DTYPES:
        return False
    on_device = x.device.type == "cuda" or (x.device.type == "cpu" and interpreting())
    return on_device and triton_available()
