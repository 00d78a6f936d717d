"""The Triton kernels, run on CPU tensors by triton's interpreter (``TRITON_INTERPRET=1``).

Small shapes only (the interpreter executes each program in numpy). ``MAX_BLOCK`` is lowered
so that rows of a few hundred elements already take several chunks of the row loop. Same
accuracy rule as ``test_kernels.py``. Performance is not measured here (no GPU).
"""

import importlib
import os

import pytest
import torch
from test_kernels import (
    HALF,
    OPS,
    B,
    W,
    check_fp32_against_float64,
    check_half_against_naive,
    make,
    reference_op,
    run_with_grads,
)

from polycom import functional, kernels


def _import_interpreted():
    """Import triton and the kernels with TRITON_INTERPRET=1 (read when functions are decorated).

    The flag is restored at once, so other test files never see it; ``None`` when triton is
    missing or was already imported in GPU mode by an earlier test.
    """
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        if not kernels.triton_available():
            return None
        import triton.language.standard

        if "Interpreted" not in type(triton.language.standard.sum).__name__:
            return None
        return importlib.import_module("polycom.kernels.polycom_triton")
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


triton_kernels = _import_interpreted()
pytestmark = pytest.mark.skipif(
    triton_kernels is None, reason="triton missing, or already imported without TRITON_INTERPRET=1"
)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """``impl="triton"`` accepts CPU tensors only in interpreter mode; rows use 64-wide chunks."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_kernels, "MAX_BLOCK", 64)


def triton_op(op):
    return lambda x, w, b: getattr(functional, op)(x, w, b, impl="triton")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "one_row"])
@pytest.mark.parametrize("width", [7, 300])
def test_fp32_matches_float64_reference(op, layout, width):
    check_fp32_against_float64(op, triton_op(op), width, layout, rows=9)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_no_worse_than_twice_naive_same_dtype(op, dtype):
    check_half_against_naive(op, triton_op(op), dtype, width=300)


@pytest.mark.parametrize("op", OPS)
def test_empty_and_nan(op):
    x = torch.randn(0, 16)
    ours = run_with_grads(triton_op(op), x, W, B, torch.ones(0, 16))
    assert [t.shape for t in ours] == [(0, 16), (0, 16), (3,), (1,)]
    x = make((3, 9), torch.float32)
    x[1, 4] = float("nan")
    ours = run_with_grads(triton_op(op), x, W, B, torch.ones(3, 9))
    ref = run_with_grads(lambda *a: reference_op(op, *a), x, W, B, torch.ones(3, 9))
    for got, want in zip(ours, ref, strict=True):
        assert torch.equal(got.isnan(), want.isnan())


@pytest.mark.parametrize("op", OPS)
def test_weight_grads_are_deterministic(op):
    x, dy = make((10, 130), torch.float32), make((10, 130), torch.float32, seed=1)
    first = run_with_grads(triton_op(op), x, W, B, dy)
    second = run_with_grads(triton_op(op), x, W, B, dy)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_auto_prefers_the_cpu_kernels_on_cpu_tensors():
    assert functional._pick("auto", torch.zeros(2, 3), 3).name in ("cpu", "reference")
    assert functional._pick("triton", torch.zeros(2, 3), 3).name == "triton"
