"""Modules, the registry, official state-dict compatibility and input validation."""

import io

import pytest
import torch
from torch import nn

import polycom
from polycom import (
    ACTIVATIONS,
    PolyCom,
    PolyNorm,
    PolyReLU,
    build_activation,
    get_activation_spec,
    no_weight_decay_names,
)
from polycom.functional import IMPLEMENTATIONS, available_impls, poly_norm
from polycom.functional import polycom as polycom_fn


class OfficialPolyNorm(nn.Module):
    """The official PolyNorm, restated from its formulas (README and training code)."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3) / 3)
        self.bias = nn.Parameter(torch.zeros(1))
        self.eps = eps

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        w, b = self.weight, self.bias
        return w[0] * self._norm(x**3) + w[1] * self._norm(x**2) + w[2] * self._norm(x) + b


class OfficialPolyReLU(nn.Module):
    """The official PolyReLU, restated from its formulas."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3) / 3)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        x = torch.relu(x)
        w, b = self.weight, self.bias
        return w[0] * x**3 + w[1] * x**2 + w[2] * x + b


@pytest.mark.parametrize(
    ("official_cls", "ours_cls"), [(OfficialPolyNorm, PolyNorm), (OfficialPolyReLU, PolyReLU)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_official_state_dict_loads_and_gives_identical_outputs(official_cls, ours_cls, dtype):
    torch.manual_seed(0)
    official = official_cls().to(dtype)
    with torch.no_grad():
        official.weight.copy_(torch.randn(3))
        official.bias.copy_(torch.randn(1))
    buffer = io.BytesIO()
    torch.save(official.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    x = torch.randn(4, 6, 301, dtype=dtype)
    expected = official(x)
    for impl in available_impls():
        ours = ours_cls(impl=impl).to(dtype)
        ours.load_state_dict(state)  # strict: same keys and shapes for every impl
        if impl == "reference":  # the spec evaluates in the official order: bit for bit
            assert torch.equal(ours(x), expected)
        elif impl == "auto" or IMPLEMENTATIONS[impl].supports(x):  # fused sums round differently
            torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


def test_state_dict_layout_and_init():
    for cls in (PolyNorm, PolyReLU, PolyCom):
        sd = cls().state_dict()
        assert list(sd) == ["weight", "bias"]
        assert sd["weight"].shape == (3,) and sd["bias"].shape == (1,)
        torch.testing.assert_close(sd["weight"], torch.full((3,), 1 / 3))
        torch.testing.assert_close(sd["bias"], torch.zeros(1))
    assert PolyNorm().eps == 1e-6
    assert PolyNorm(order=4).weight.shape == (4,)
    torch.testing.assert_close(PolyReLU(order=4).weight, torch.full((4,), 0.25))


def test_same_state_dict_for_polycom_spelling_of_polynorm():
    net = PolyNorm()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([0.1, 0.2, 0.3]))
    general = PolyCom(rho="norm", composition="type2")
    general.load_state_dict(net.state_dict())
    x = torch.randn(3, 40)
    torch.testing.assert_close(general(x), net(x))


def test_reset_parameters_restores_init():
    act = PolyCom(order=4, rho="prelu")
    with torch.no_grad():
        for p in act.parameters():
            p.add_(1.0)
    act.reset_parameters()
    torch.testing.assert_close(act.weight, torch.full((4,), 0.25))
    torch.testing.assert_close(act.bias, torch.zeros(1))
    torch.testing.assert_close(act.prelu_weight, torch.full((1,), 0.25))


def test_coefficients_are_tagged_for_no_weight_decay():
    model = nn.Sequential(nn.Linear(4, 8), PolyNorm(), nn.Linear(8, 4), PolyCom(rho="prelu"))
    assert no_weight_decay_names(model) == {"1.weight", "1.bias", "3.weight", "3.bias", "3.prelu_weight"}
    # The module walk still finds them when a wrapper replaced the parameter objects.
    model[1].weight = nn.Parameter(model[1].weight.detach().clone())
    assert "1.weight" in no_weight_decay_names(model)


def test_modules_work_on_meta_and_in_other_dtypes():
    act = PolyNorm(device="meta")
    assert act.weight.is_meta
    y = PolyReLU(dtype=torch.bfloat16)(torch.randn(2, 5, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


# ---- registry ----


def test_registry_has_the_paper_activations_and_baselines():
    expected = {
        "relu",
        "gelu",
        "gelu_tanh",
        "relu2",
        "silu",
        "swiglu",
        "geglu",
        "polyrelu",
        "polynorm",
        "polycom",
        "polyprelu",
        "polyrelunorm",
    }
    assert expected <= set(ACTIVATIONS)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_every_registered_activation_builds_and_runs(name):
    spec = get_activation_spec(name)
    act = build_activation(name)
    hidden = spec.hidden_width(12)
    x = torch.randn(2, 3, spec.up_features(hidden))
    assert act(x).shape == (2, 3, hidden)


def test_parameter_matched_widths():
    swiglu, polynorm = get_activation_spec("swiglu"), get_activation_spec("polynorm")
    assert (swiglu.num_up_projections, polynorm.num_up_projections) == (2, 1)
    assert swiglu.hidden_width(8256) == 5504  # paper dense 1B
    assert swiglu.hidden_width(1536) == 1024  # paper MoE expert
    assert polynorm.hidden_width(8256) == 8256
    assert swiglu.hidden_width(2048) == 1365
    assert swiglu.hidden_width(2048, multiple_of=64) == 1344  # nearest multiple of 64
    d = 2048
    for base in (8256, 1536, 3000):
        gated = 3 * d * swiglu.hidden_width(base)
        plain = 2 * d * polynorm.hidden_width(base)
        assert abs(gated - plain) / plain < 1e-3


def test_gelu_variants():
    x = torch.randn(100)
    torch.testing.assert_close(build_activation("gelu")(x), torch.nn.functional.gelu(x))
    tanh = torch.nn.functional.gelu(x, approximate="tanh")
    torch.testing.assert_close(build_activation("gelu_tanh")(x), tanh)
    torch.testing.assert_close(build_activation("gelu", approximate="tanh")(x), tanh)


def test_gated_activation_formula():
    x = torch.randn(3, 10)
    g, u = x[:, :5], x[:, 5:]
    torch.testing.assert_close(build_activation("swiglu")(x), torch.nn.functional.silu(g) * u)
    torch.testing.assert_close(build_activation("geglu")(x), torch.nn.functional.gelu(g) * u)
    torch.testing.assert_close(build_activation("relu2")(x), torch.relu(x) ** 2)


def test_ablation_names_map_to_their_polycom():
    x = torch.randn(4, 9)
    torch.testing.assert_close(
        build_activation("polyrelunorm")(x), PolyCom(rho="norm", composition="type2", pre="relu")(x)
    )
    assert build_activation("polyprelu").prelu_weight is not None
    assert build_activation("polyrelu", order=4).order == 4


# ---- clear errors ----


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: build_activation("polynrom"), "valid: relu"),
        (lambda: build_activation("relu", order=3), "valid options: none"),
        (lambda: build_activation("polynorm", rho="relu"), "valid options: order"),
        (lambda: PolyReLU(order=0), "order must be an integer >= 1"),
        (lambda: PolyNorm(order=2.5), "order must be an integer >= 1"),
        (lambda: PolyNorm(order=True), "order must be an integer >= 1"),
        (lambda: PolyCom(rho="softplus"), "valid: relu, norm, l2norm, prelu"),
        (lambda: PolyCom(composition="type3"), "valid: type1, type2"),
        (lambda: PolyCom(pre="relu"), "composition='type2' only"),
        (lambda: PolyNorm(eps=-1.0), "eps must be a finite number"),
        (lambda: PolyNorm(impl="cuda-magic"), "valid: auto, reference"),
        (lambda: PolyNorm(dtype=torch.int32), "not floating"),
        (lambda: PolyNorm()(torch.ones(3, dtype=torch.int64)), "accept floating inputs only"),
        (lambda: PolyNorm()(torch.tensor(1.0)), "at least one dimension"),
        (lambda: poly_norm(torch.randn(3), torch.ones(3), torch.ones(2)), "bias must have exactly one"),
        (lambda: poly_norm(torch.randn(3), torch.ones(3, 1), torch.ones(1)), "weight must have shape [r]"),
        (lambda: poly_norm(torch.randn(3), torch.ones(3), torch.ones(1), impl="nope"), "unknown impl"),
        (
            lambda: polycom_fn(torch.randn(3), torch.ones(3), torch.ones(1), rho="tanh", impl="cpu"),
            "has no kernel",
        ),
        (lambda: get_activation_spec("swiglu").hidden_width(0), "base_width must be a positive integer"),
    ],
)
def test_bad_input_gets_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=None) as info:
        call()
    assert message in str(info.value)


def test_public_api():
    for name in (
        "PolyReLU",
        "PolyNorm",
        "PolyCom",
        "poly_relu",
        "poly_norm",
        "polycom",
        "build_activation",
        "ACTIVATIONS",
    ):
        assert hasattr(polycom, name)


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_gradcheck_every_registered_activation(name):
    """float64 gradcheck through input and every parameter of each registry entry."""
    spec = get_activation_spec(name)
    act = build_activation(name, dtype=torch.float64) if spec.has_parameters else build_activation(name)
    names = [n for n, _ in act.named_parameters()]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, spec.up_features(4), generator=g, dtype=torch.float64)
    x = (x.sign() * (x.abs() + 0.1)).requires_grad_(True)  # away from the ReLU kink

    def fn(x, *values):
        return torch.func.functional_call(act, dict(zip(names, values, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *act.parameters()), eps=1e-6, atol=1e-6)
