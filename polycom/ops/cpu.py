"""Fused CPU PolyNorm / PolyReLU (order 3): one C++ file, compiled once, called through ctypes.

Why this technology: the kernels need SIMD and threads over rows, a first call in a fresh
process well under 2 s, and a clean fallback where no compiler exists. A torch C++ extension
takes 30-60 s to compile (the torch headers), and numba adds a dependency and JIT time per
process. ``csrc/polycom_cpu.cpp`` includes no torch headers, so ``g++ -O3 -march=native
-fopenmp`` builds it in about a second; the shared library is cached (keyed by source, flags and
CPU) and later processes only ``dlopen`` it (milliseconds). ``make install`` builds it ahead of
time (``python -m polycom.ops.cpu_build``). If it cannot be built, :func:`available` is False,
a warning says why (once) and ``impl="auto"`` runs the reference.

Tensors here are 2-D views ``[rows, d]`` (rows may be strided, the last dim contiguous).
PolyNorm's forward returns ``y`` and ``rstd`` (``[rows, 3]``: ``1/sqrt(mean(x^(2p)) + eps)`` for
p = 3, 2, 1; fp32, or fp64 for fp64 input) -- the only thing saved for backward besides ``x``.
The autograd wiring lives in :mod:`polycom.ops.library`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from polycom.paths import cache_dir

__all__ = [
    "SUPPORTED_DTYPES",
    "available",
    "build_library",
    "poly_norm_backward",
    "poly_norm_forward",
    "poly_relu_backward",
    "poly_relu_forward",
    "supports",
]

SOURCE = Path(__file__).parent / "csrc" / "polycom_cpu.cpp"
# -ffp-contract=off: no fused multiply-adds the source does not spell out (PolyReLU then rounds
# exactly like the official module); -march=native: AVX2/AVX-512 where the CPU has them.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failure: str | None = None


# ---- output allocation -------------------------------------------------------------------
# A fresh multi-MB tensor costs one page fault per 4 KiB page on first write; on a 2-core machine
# that is ~60% of a memory-bound kernel's time ([8192 x 8256] fp32: 37 of 59 ms of a clone).
# Where transparent huge pages are on in "madvise" mode (common Linux default), asking for them
# on the output cuts the faults 512-fold. Outputs are ordinary tensors: a 2 MiB-aligned view of a
# slightly larger (by < 2 MiB) byte buffer. Set POLYCOM_CPU_HUGEPAGES=0 to use torch.empty.
_HUGEPAGE = 2 << 20
_HUGEPAGE_MIN_BYTES = 16 << 20
_MADV_HUGEPAGE = 14


def _load_madvise():
    if sys.platform != "linux" or os.environ.get("POLYCOM_CPU_HUGEPAGES", "1") == "0":
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def empty_output(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)``, backed by huge pages when large (see above)."""
    nbytes = shape.numel() * dtype.itemsize
    if _madvise is None or nbytes < _HUGEPAGE_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    buffer = torch.empty(nbytes + _HUGEPAGE, dtype=torch.uint8)
    offset = -buffer.data_ptr() % _HUGEPAGE
    _madvise(buffer.data_ptr() + offset, nbytes - nbytes % _HUGEPAGE, _MADV_HUGEPAGE)  # advice only
    return buffer[offset : offset + nbytes].view(dtype).view(shape)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cpu_signature() -> str:
    """CPU model and flags: ``-march=native`` code must not be reused on a different CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return cache_dir() / "kernels"


def library_path(compiler: str) -> Path:
    """Cache path of the shared library for this source, compiler, flags and CPU."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(), _cpu_signature().encode()):
        key.update(part)
    return _cache_dir() / f"polycom_cpu-{key.hexdigest()[:16]}.so"


def build_library(force: bool = False) -> Path:
    """Compile the kernels into the cache (atomically: temp file, then rename); return the path.

    Raises ``RuntimeError`` with the compiler's message if it fails.
    """
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    target = library_path(compiler)
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, str(SOURCE), "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as err:  # the compiler itself cannot be run
            raise RuntimeError(f"cannot run {compiler!r}: {err}") from err
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, dbl, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    signatures = {
        "polycom_poly_norm_fwd": [i32, ptr, ptr, ptr, i64, i64, i64, ptr, dbl, i32],
        "polycom_poly_norm_bwd": [i32, ptr, i64, ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, i32],
        "polycom_poly_relu_fwd": [i32, ptr, ptr, i64, i64, i64, ptr, i32],
        "polycom_poly_relu_bwd": [i32, ptr, i64, ptr, i64, ptr, i64, i64, ptr, ptr, ptr, i32],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int


def _load() -> ctypes.CDLL | None:
    """Load (building on first use) the library; ``None`` with a one-time warning if impossible."""
    global _lib, _failure
    if _lib is not None or _failure is not None:
        return _lib
    with _lock:
        if _lib is None and _failure is None:
            try:
                lib = ctypes.CDLL(str(build_library()))
                _declare(lib)
                _lib = lib
            except (RuntimeError, OSError) as err:
                _failure = str(err)
                warnings.warn(
                    f"polycom: fused CPU kernels unavailable, using the reference ops instead ({err})",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _lib


def available() -> bool:
    """True when the compiled kernels can be used (builds them on first call)."""
    return _load() is not None


def supports(x: torch.Tensor) -> bool:
    """CPU tensors of fp32 / fp16 / bf16 / fp64, once the library is built."""
    return x.device.type == "cpu" and x.dtype in SUPPORTED_DTYPES and available()


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """``[..., d] -> [rows, d]`` without a copy when possible; the last dim made contiguous."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t2.shape[-1] > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def row_stride(t2: torch.Tensor) -> int:
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def _coefficients(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``[w0, w1, w2, b]`` as a contiguous float64 CPU tensor (what the kernels read)."""
    return torch.cat([weight.detach().reshape(-1), bias.detach().reshape(-1)]).to("cpu", torch.float64)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _check(code: int, name: str) -> None:
    if code != 0:
        raise RuntimeError(f"polycom CPU kernel {name} returned error code {code}")


def poly_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PolyNorm forward: ``x [..., d] -> (y [..., d] in x.dtype, rstd [rows, 3])``."""
    lib = _load()
    d = x.shape[-1]
    x2 = rows_view(x)
    rows = x2.shape[0]
    y = empty_output(x.shape, x.dtype)
    rstd = torch.empty(rows, 3, dtype=_stats_dtype(x.dtype))
    if rows == 0 or d == 0:
        return y, rstd.fill_(float("nan") if d == 0 else 0.0)
    coef = _coefficients(weight, bias)
    code = lib.polycom_poly_norm_fwd(
        _DTYPE_CODE[x.dtype], x2.data_ptr(), y.data_ptr(), rstd.data_ptr(), rows, d, row_stride(x2),
        coef.data_ptr(), float(eps), _threads(),
    )  # fmt: skip
    _check(code, "poly_norm_fwd")
    return y, rstd


def _grad_outputs(weight, bias, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return out[:3].to(weight.dtype), out[3:].to(bias.dtype).reshape(bias.shape)


def poly_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PolyNorm backward from ``x`` and ``rstd`` only: returns ``(dx, dweight [3], dbias [1])``."""
    lib = _load()
    d = x.shape[-1]
    x2, g2 = rows_view(x), rows_view(dy.to(x.dtype))
    rows = x2.shape[0]
    dx = empty_output(x.shape, x.dtype)
    out = torch.zeros(4, dtype=torch.float64)
    if rows > 0 and d > 0:
        partial = torch.empty(rows, 4, dtype=torch.float64)
        coef, rstd = _coefficients(weight, bias), rstd.contiguous()  # keep alive across the call
        code = lib.polycom_poly_norm_bwd(
            _DTYPE_CODE[x.dtype], g2.data_ptr(), row_stride(g2), x2.data_ptr(), row_stride(x2),
            dx.data_ptr(), rstd.data_ptr(), rows, d, coef.data_ptr(), partial.data_ptr(), out.data_ptr(),
            _threads(),
        )  # fmt: skip
        _check(code, "poly_norm_bwd")
    return (dx, *_grad_outputs(weight, bias, out))


def poly_relu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """PolyReLU forward: ``x [..., d] -> y [..., d]`` in x.dtype."""
    lib = _load()
    x2 = rows_view(x)
    y = empty_output(x.shape, x.dtype)
    if x2.numel() > 0:
        coef = _coefficients(weight, bias)  # a named tensor: its memory must outlive the call
        code = lib.polycom_poly_relu_fwd(
            _DTYPE_CODE[x.dtype], x2.data_ptr(), y.data_ptr(), x2.shape[0], x2.shape[1], row_stride(x2),
            coef.data_ptr(), _threads(),
        )  # fmt: skip
        _check(code, "poly_relu_fwd")
    return y


def poly_relu_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PolyReLU backward from ``x`` only: returns ``(dx, dweight [3], dbias [1])``."""
    lib = _load()
    x2, g2 = rows_view(x), rows_view(dy.to(x.dtype))
    dx = empty_output(x.shape, x.dtype)
    out = torch.zeros(4, dtype=torch.float64)
    if x2.numel() > 0:
        rows, d = x2.shape
        partial = torch.empty(rows, 4, dtype=torch.float64)
        coef = _coefficients(weight, bias)
        code = lib.polycom_poly_relu_bwd(
            _DTYPE_CODE[x.dtype], g2.data_ptr(), row_stride(g2), x2.data_ptr(), row_stride(x2),
            dx.data_ptr(), rows, d, coef.data_ptr(), partial.data_ptr(),
            out.data_ptr(), _threads(),
        )  # fmt: skip
        _check(code, "poly_relu_bwd")
    return (dx, *_grad_outputs(weight, bias, out))
