"""The reference ops against an independent float64 re-derivation of the official formulas."""

import numpy as np
import pytest
import torch

from polycom import PolyCom, PolyNorm, PolyReLU
from polycom.ops import reference

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Result is rounded once to the output dtype after fp32 (or fp64) math: half an ulp plus slack.
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def numpy_poly_norm(x: np.ndarray, w: np.ndarray, b: float, eps: float = 1e-6) -> np.ndarray:
    """Official PolyNorm in float64: sum_j w[j] * x^(r-j) / sqrt(mean(x^(2(r-j))) + eps) + b."""
    r = len(w)
    out = np.full(x.shape, b, dtype=np.float64)
    for j in range(r):
        u = x ** (r - j)
        out += w[j] * u / np.sqrt(np.mean(u * u, axis=-1, keepdims=True) + eps)
    return out


def numpy_poly_relu(x: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    """Official PolyReLU in float64: sum_j w[j] * max(x, 0)^(r-j) + b."""
    r = len(w)
    z = np.maximum(x, 0.0)
    return sum(w[j] * z ** (r - j) for j in range(r)) + b


def make_input(shape, dtype, contiguous, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5
    if not contiguous:  # same logical shape, transposed storage
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
        assert not x.is_contiguous() or shape[0] == 1 or shape[1] == 1
    return x.to(dtype)


def assert_close_to(y: torch.Tensor, ref: np.ndarray, dtype: torch.dtype) -> None:
    assert y.dtype == dtype
    got = y.detach().double().numpy()
    scale = max(1.0, float(np.sqrt(np.mean(ref**2))))
    err = np.abs(got - ref)
    bound = RTOL[dtype] * (np.abs(ref) + scale)
    assert np.all(err <= bound), f"max err {err.max():.3e}, worst ratio {(err / bound).max():.2f}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 7, 8257])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_poly_norm_matches_float64_rederivation(dtype, width, contiguous):
    x = make_input((3, 4, width), dtype, contiguous)
    w = torch.tensor([0.7, -0.4, 1.3])
    b = torch.tensor([0.25])
    y = reference.poly_norm(x, w, b)
    ref = numpy_poly_norm(x.double().numpy(), w.double().numpy(), b.double().item())
    assert y.shape == x.shape
    assert_close_to(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 7, 8257])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
def test_poly_relu_matches_float64_rederivation(dtype, width, contiguous):
    x = make_input((3, 4, width), dtype, contiguous, seed=1)
    w = torch.tensor([0.2, -0.5, 0.9])
    b = torch.tensor([-0.1])
    y = reference.poly_relu(x, w, b)
    ref = numpy_poly_relu(x.double().numpy(), w.double().numpy(), b.double().item())
    assert_close_to(y, ref, dtype)


@pytest.mark.parametrize("order", [1, 2, 4])
def test_other_orders_match_rederivation(order):
    x = make_input((5, 33), torch.float64, True, seed=order)
    w = torch.linspace(-1, 1, order, dtype=torch.float64) + 0.1
    b = torch.tensor([0.3], dtype=torch.float64)
    np.testing.assert_allclose(
        reference.poly_norm(x, w, b).numpy(),
        numpy_poly_norm(x.numpy(), w.numpy(), 0.3),
        rtol=1e-12,
        atol=1e-14,
    )
    np.testing.assert_allclose(
        reference.poly_relu(x, w, b).numpy(),
        numpy_poly_relu(x.numpy(), w.numpy(), 0.3),
        rtol=1e-12,
        atol=1e-14,
    )


def test_l2norm_rho_is_rms_norm_over_sqrt_d():
    """The paper's written form u/||u|| equals the code's RMS form divided by sqrt(d)."""
    x = make_input((4, 50), torch.float64, True)
    w, b = torch.ones(3, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    l2 = reference.polycom(x, w, b, rho="l2norm", composition="type2", eps=0.0)
    rms = reference.polycom(x, w, b, rho="norm", composition="type2", eps=0.0)
    torch.testing.assert_close(l2 * 50**0.5, rms)


def test_type1_and_type2_follow_their_formulas():
    x = make_input((3, 9), torch.float64, True)
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([0.1], dtype=torch.float64)
    t = torch.tanh(x)
    type1 = reference.polycom(x, w, b, rho="tanh", composition="type1")
    torch.testing.assert_close(type1, 0.5 * t**3 - t**2 + 2 * t + 0.1)
    type2 = reference.polycom(x, w, b, rho="tanh", composition="type2")
    torch.testing.assert_close(type2, 0.5 * torch.tanh(x**3) - torch.tanh(x**2) + 2 * t + 0.1)
    relunorm = reference.polycom(x, w, b, rho="norm", composition="type2", pre="relu")
    z = torch.relu(x)
    expected = sum(c * reference.rms_normalize(z**p) for c, p in zip(w, (3, 2, 1), strict=True)) + 0.1
    torch.testing.assert_close(relunorm, expected)


def test_prelu_rho_uses_learned_slope():
    x = torch.tensor([[-2.0, 3.0]], dtype=torch.float64)
    w = torch.tensor([0.0, 1.0], dtype=torch.float64)  # order 2, linear term only
    b = torch.zeros(1, dtype=torch.float64)
    y = reference.polycom(x, w, b, rho="prelu", prelu_slope=torch.tensor([0.1], dtype=torch.float64))
    torch.testing.assert_close(y, torch.tensor([[-0.2, 3.0]], dtype=torch.float64))


# ---- Lemma 1: ReLU, ReLU^2 and polynomials are special cases of PolyReLU ----


def test_lemma1_relu_and_relu_squared():
    x = torch.randn(64, 17, dtype=torch.float64)
    act = PolyReLU(order=3, dtype=torch.float64)
    with torch.no_grad():
        act.weight.copy_(torch.tensor([0.0, 0.0, 1.0]))  # a = (a0, a1, a2, a3) = (0, 1, 0, 0)
    torch.testing.assert_close(act(x), torch.relu(x), rtol=0, atol=0)
    with torch.no_grad():
        act.weight.copy_(torch.tensor([0.0, 1.0, 0.0]))  # square coefficient alone
    torch.testing.assert_close(act(x), torch.relu(x) ** 2, rtol=0, atol=0)


def test_lemma1_any_cubic_is_two_polyrelu_units():
    """p(t) = PolyReLU_a(t) + PolyReLU_a'(-t) with a_i = b_i, a'_i = (-1)^i b_i, a'_0 = 0."""
    g = torch.Generator().manual_seed(3)
    b0, b1, b2, b3 = torch.randn(4, generator=g, dtype=torch.float64).tolist()
    t = torch.linspace(-3, 3, 1001, dtype=torch.float64)
    plus = PolyReLU(dtype=torch.float64)
    minus = PolyReLU(dtype=torch.float64)
    with torch.no_grad():
        plus.weight.copy_(torch.tensor([b3, b2, b1], dtype=torch.float64))
        plus.bias.fill_(b0)
        minus.weight.copy_(torch.tensor([-b3, b2, -b1], dtype=torch.float64))
        minus.bias.zero_()
    p = b0 + b1 * t + b2 * t**2 + b3 * t**3
    torch.testing.assert_close(plus(t) + minus(-t), p, rtol=1e-12, atol=1e-12)


# ---- edge cases ----


@pytest.mark.parametrize("cls", [PolyNorm, PolyReLU])
def test_zero_row_gives_bias_with_finite_grads(cls):
    act = cls()
    with torch.no_grad():
        act.bias.fill_(0.5)
    x = torch.zeros(2, 3, 16, requires_grad=True)
    y = act(x)
    torch.testing.assert_close(y, torch.full_like(y, 0.5))
    (y * torch.randn_like(y)).sum().backward()
    for grad in (x.grad, act.weight.grad, act.bias.grad):
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("cls", [PolyNorm, PolyReLU])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_propagate_without_raising(cls, bad):
    x = torch.randn(2, 8)
    x[0, 3] = bad
    y = cls()(x)
    assert not torch.isfinite(y[0, 3])
    assert torch.isfinite(y[1]).all()  # other rows are untouched
    if cls is PolyNorm:  # the row statistic is poisoned: the whole row is NaN-or-finite, no raise
        assert torch.isnan(y[0, 3])


def test_poly_relu_of_minus_inf_is_the_bias():
    """relu(-inf) = 0 exactly, so PolyReLU maps -inf to its bias (correct, not an error)."""
    y = PolyReLU()(torch.tensor([float("-inf"), 1.0]))
    assert y[0].item() == 0.0


def test_fp16_large_inputs_stay_finite():
    x = (torch.rand(4, 1024) * 2 - 1) * 1e4
    x[:, 0] = 1e4
    x = x.half()
    y = PolyNorm()(x)
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all()
    ref = numpy_poly_norm(x.double().numpy(), np.full(3, 1 / 3), 0.0)
    assert_close_to(y, ref, torch.float16)


# ---- gradcheck ----


def _gradcheck_module(module: torch.nn.Module, x: torch.Tensor) -> None:
    params = [p for _, p in sorted(module.named_parameters())]
    names = [n for n, _ in sorted(module.named_parameters())]

    def fn(x, *values):
        state = dict(zip(names, values, strict=True))
        return torch.func.functional_call(module, state, (x,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6)


def _away_from_kinks(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (x.sign() * (x.abs() + 0.1)).requires_grad_(True)


@pytest.mark.parametrize(
    "module",
    [
        PolyReLU(dtype=torch.float64),
        PolyNorm(dtype=torch.float64),
        PolyReLU(order=1, dtype=torch.float64),
        PolyNorm(order=4, dtype=torch.float64),
        *[
            PolyCom(rho=r, composition=c, dtype=torch.float64)
            for r in reference.RHO_FUNCTIONS
            for c in reference.COMPOSITIONS
        ],
        PolyCom(rho="norm", composition="type2", pre="relu", dtype=torch.float64),
    ],
    ids=lambda m: repr(m).replace(" ", ""),
)
def test_gradcheck_float64(module):
    with torch.no_grad():  # non-trivial coefficients so every term contributes
        module.weight.copy_(torch.linspace(0.3, 1.1, module.order, dtype=torch.float64))
        module.bias.fill_(0.2)
    _gradcheck_module(module, _away_from_kinks((2, 3, 5), seed=module.order))
