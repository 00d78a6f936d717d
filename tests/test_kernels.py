"""The fused CPU kernels (polycom.ops.cpu via the torch.library ops) against the reference.

Accuracy rule (the issue's): compared with a float64 reference,
* fp32 results are within 1e-5 relative: ``|ours - ref64| <= 1e-5 * (|ref64| + max|ref64|)``,
  or, where the float64 result itself is the small difference of large terms (the x-gradient of
  a width-1 PolyNorm is ~eps/|x|^3), no worse than 2x the error of the fp32 reference op plus
  1e-7 (one fp32 ulp of the O(1) terms that cancel);
* fp16 / bf16 results have a max error no worse than 2x that of a *naive same-dtype*
  computation: the reference formula evaluated entirely in the input's half dtype (powers,
  mean, rsqrt, coefficients; :func:`naive_half`), i.e. what a kernel that does not upcast gives.
The same rule applies to the gradients of x, weight and bias.
"""

import pytest
import torch

from polycom import PolyNorm, PolyReLU, functional
from polycom.ops import cpu, library, reference

pytestmark = pytest.mark.skipif(not cpu.available(), reason="fused CPU kernels could not be built")

HALF = (torch.bfloat16, torch.float16)
OPS = ("poly_norm", "poly_relu")
W = torch.tensor([0.7, -0.4, 1.3])
B = torch.tensor([0.25])


def naive_half(op: str, x, w, b, eps=1e-6):
    """The reference formula computed entirely in x.dtype (no fp32 upcast anywhere)."""
    w, b = w.to(x.dtype), b.to(x.dtype)
    if op == "poly_relu":
        z = torch.relu(x)
        return w[0] * z**3 + w[1] * z**2 + w[2] * z + b
    terms = [x**p * torch.rsqrt((x**p * x**p).mean(-1, keepdim=True) + eps) for p in (3, 2, 1)]
    return w[0] * terms[0] + w[1] * terms[1] + w[2] * terms[2] + b


def reference_op(op: str, x, w, b):
    return getattr(reference, op)(x, w, b)


def run_with_grads(fn, x, w, b, dy):
    """``fn(x, w, b)`` and the gradients of ``(y * dy).sum()`` w.r.t. x, w, b."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


def make(shape, dtype, seed=0, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def max_err(got, ref64):
    return (got.double() - ref64).abs().max().item()


def assert_fp32_close(got, ref64, ref32=None, rtol=1e-5):
    bound = rtol * (ref64.abs() + ref64.abs().max())
    err = (got.double() - ref64).abs()
    if ref32 is not None and max_err(got, ref64) <= 2 * max_err(ref32, ref64) + 1e-7:
        return
    assert bool((err <= bound).all()), f"max err {err.max():.3e}, worst ratio {(err / bound).max():.2f}"


def fused(op):
    return lambda x, w, b: getattr(functional, op)(x, w, b, impl="cpu")


def check_fp32_against_float64(op: str, run, width: int, layout: str, rows: int) -> None:
    """``run(x, w, b)`` (an impl of ``op``) on fp32 input: y, dx, dw, db within the fp32 rule of
    the float64 reference. ``layout``: contiguous 3-D, strided 2-D (transposed storage) or one row."""
    shape = {"contiguous": (3, 4, width), "strided": (rows, width), "one_row": (1, width)}[layout]
    x = make(shape, torch.float32)
    if layout == "strided":  # same values, transposed storage: rows are not contiguous
        x = x.t().contiguous().t()
    dy = make(shape, torch.float32, seed=1)
    ours = run_with_grads(run, x, W, B, dy)
    ref32 = run_with_grads(lambda *a: reference_op(op, *a), x, W, B, dy)
    ref = run_with_grads(lambda *a: reference_op(op, *a), x.double(), W.double(), B.double(), dy.double())
    for got, fp32, want in zip(ours, ref32, ref, strict=True):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert_fp32_close(got, want, fp32)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("width", [1, 7, 8257])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "one_row"])
def test_fp32_matches_float64_reference(op, width, layout):
    check_fp32_against_float64(op, fused(op), width, layout, rows=5)


def check_half_against_naive(op: str, run, dtype: torch.dtype, width: int) -> None:
    """``run(x, w, b)`` on ``dtype`` input: y, dx, dw, db no worse than twice the error of the
    naive same-dtype formula, both against the float64 reference."""
    x = make((6, width), dtype)
    dy = make((6, width), dtype, seed=1, scale=1.0)
    ours = run_with_grads(run, x, W, B, dy)
    naive = run_with_grads(lambda *a: naive_half(op, *a), x, W, B, dy)
    ref = run_with_grads(lambda *a: reference_op(op, *a), x.double(), W.double(), B.double(), dy.double())
    for name, got, bad, want in zip(("y", "dx", "dw", "db"), ours, naive, ref, strict=True):
        assert got.dtype == bad.dtype
        # floor: half an ulp of the output's magnitude, for cases where naive happens to be exact
        floor = torch.finfo(dtype).eps * want.abs().max().item()
        assert max_err(got, want) <= max(2 * max_err(bad, want), floor), name


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("width", [7, 8257])
def test_half_no_worse_than_twice_naive_same_dtype(op, dtype, width):
    check_half_against_naive(op, fused(op), dtype, width)


def test_poly_norm_gradcheck_float64():
    x = make((3, 5), torch.float64).requires_grad_()
    w = W.double().requires_grad_()
    b = B.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: functional.poly_norm(*a, impl="cpu"), (x, w, b))


def test_poly_relu_gradcheck_float64():
    x = make((3, 5), torch.float64)
    x = (x + 0.1 * torch.sign(x)).requires_grad_()  # keep away from the kink at 0
    w = W.double().requires_grad_()
    b = B.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: functional.poly_relu(*a, impl="cpu"), (x, w, b))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16), (4, 0)])
def test_empty_inputs(op, shape):
    x = torch.randn(shape)
    ours = run_with_grads(fused(op), x, W, B, torch.ones(shape))
    ref = run_with_grads(lambda *a: reference_op(op, *a), x, W, B, torch.ones(shape))
    for got, want in zip(ours, ref, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op", OPS)
def test_nan_propagates_like_the_reference(op):
    x = make((4, 9), torch.float32)
    x[1, 3] = float("nan")
    dy = torch.ones(4, 9)
    ours = run_with_grads(fused(op), x, W, B, dy)
    ref = run_with_grads(lambda *a: reference_op(op, *a), x, W, B, dy)
    for got, want in zip(ours, ref, strict=True):
        assert torch.equal(got.isnan(), want.isnan())
    assert ours[0][1].isnan().any() and not ours[0][0].isnan().any()


def test_zero_row_gives_bias_like_reference():
    x = torch.zeros(2, 8)
    torch.testing.assert_close(functional.poly_norm(x, W, B, impl="cpu"), reference.poly_norm(x, W, B))


@pytest.mark.parametrize("module", [PolyNorm, PolyReLU])
def test_auto_picks_cpu_and_state_dict_is_the_same(module):
    assert functional._pick("auto", torch.zeros(2, 3), 3).name == "cpu"
    assert functional._pick("auto", torch.zeros(2, 3), 4).name == "reference"
    fast, ref = module(impl="auto"), module(impl="reference")
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x = make((2, 3, 40), torch.float32)
    assert_fp32_close(fast(x), ref(x.double()).double())


@pytest.mark.parametrize("op", OPS)
def test_saves_only_x_and_row_stats(op):
    x = make((64, 300), torch.float32).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        getattr(functional, op)(x, W.clone().requires_grad_(), B.clone().requires_grad_(), impl="cpu")
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert any(t is x for t in saved)
    assert saved_bytes <= 1.05 * x.numel() * x.element_size()


@pytest.mark.parametrize("op", OPS)
def test_weight_grads_do_not_depend_on_thread_count(op):
    x, dy = make((50, 333), torch.float32), make((50, 333), torch.float32, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_with_grads(fused(op), x, W, B, dy)
        torch.set_num_threads(2)
        two = run_with_grads(fused(op), x, W, B, dy)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_half_weights_get_half_grads():
    x = make((3, 16), torch.bfloat16)
    w, b = W.bfloat16().requires_grad_(), B.bfloat16().requires_grad_()
    functional.poly_norm(x, w, b, impl="cpu").float().sum().backward()
    assert w.grad.dtype == torch.bfloat16 and b.grad.dtype == torch.bfloat16 and b.grad.shape == (1,)


def test_missing_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_failure", None)
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="fused CPU kernels unavailable"):
        assert not cpu.available()
    assert functional._pick("auto", torch.zeros(2, 3), 3).name == "reference"
    with pytest.raises(ValueError, match="impl='cpu' cannot run"):
        functional.poly_norm(torch.zeros(2, 3), W, B, impl="cpu")


def test_build_writes_library_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYCOM_CACHE", str(tmp_path))
    path = cpu.build_library()
    assert path.parent == tmp_path / "kernels" and path.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_ops_are_registered_with_fake_impls():
    x = torch.empty(2, 3, 8, device="meta")
    y, rstd = torch.ops.polycom.poly_norm_cpu(x, W.to("meta"), B.to("meta"), 1e-6)
    assert y.shape == x.shape and rstd.shape == (6, 3) and rstd.dtype == torch.float32
    for name in ("poly_norm_cpu", "poly_relu_cpu", "poly_norm_cpu_backward", "poly_relu_cpu_backward"):
        torch.library.opcheck(
            getattr(torch.ops.polycom, name),
            _opcheck_args(name),
            test_utils=("test_schema", "test_faketensor"),
        )
    assert library.BACKENDS.keys() == {"cpu", "triton"}


def _opcheck_args(name):
    x, dy = make((3, 10), torch.float32), make((3, 10), torch.float32, seed=1)
    if name == "poly_norm_cpu":
        return (x, W, B, 1e-6)
    if name == "poly_relu_cpu":
        return (x, W, B)
    if name == "poly_relu_cpu_backward":
        return (dy, x, W, B)
    rstd = torch.ops.polycom.poly_norm_cpu(x, W, B, 1e-6)[1]
    return (dy, x, W, B, rstd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_poly_relu_is_bit_identical_to_the_reference(dtype):
    x = make((7, 333), dtype)
    assert torch.equal(functional.poly_relu(x, W, B, impl="cpu"), reference.poly_relu(x, W, B))


def test_install_step_reports_a_missing_compiler_without_failing(monkeypatch, tmp_path, capsys):
    from polycom.ops import cpu_build

    monkeypatch.setenv("POLYCOM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert cpu_build.main([]) == 0
    assert "not built" in capsys.readouterr().err
    assert cpu_build.main(["--bogus"]) == 2


@pytest.mark.parametrize("numel", [7, (16 << 20) // 4 + 3])  # below and above the huge-page threshold
def test_empty_output_is_an_ordinary_tensor(numel):
    """Large fused outputs come from a 2 MiB-aligned buffer; they must behave like torch.empty."""
    shape = torch.Size([numel])
    y = cpu.empty_output(shape, torch.float32)
    assert y.shape == shape and y.dtype == torch.float32 and y.is_contiguous()
    y.fill_(1.5)
    assert float(y.sum()) == 1.5 * numel
    z = cpu.empty_output(shape, torch.float32).zero_()
    assert float(z.sum()) == 0.0 and float(y[-1]) == 1.5  # separate memory
    if numel * 4 >= 16 << 20 and cpu._madvise is not None:
        assert y.data_ptr() % (2 << 20) == 0
