"""Activation modules and the one registry that names them.

PolyCom modules (``PolyReLU``, ``PolyNorm``, ``PolyCom``) hold the learnable coefficients with
the official state-dict layout: ``weight`` of shape ``[r]`` (``weight[0]`` on the highest
power, init ``1/r``) and ``bias`` of shape ``[1]`` (init 0). *Which* activation is a module;
*how* it runs is its ``impl`` attribute (not part of the state dict).

The registry (:data:`ACTIVATIONS`, :func:`build_activation`) maps a name to an
:class:`ActivationSpec`, which also says how many up-projections an MLP needs (1, or 2 for the
gated SwiGLU / GeGLU) and computes the parameter-matched hidden width: nobody computes FFN
widths by hand anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polycom import functional
from polycom.ops import reference
from polycom.ops.reference import DEFAULT_EPS, FLOAT_DTYPES

__all__ = [
    "ACTIVATIONS",
    "ActivationSpec",
    "GatedActivation",
    "PolyCom",
    "PolyNorm",
    "PolyReLU",
    "ReLU2",
    "build_activation",
    "get_activation_spec",
    "no_weight_decay_names",
]

NO_WEIGHT_DECAY = "_no_weight_decay"
"""Attribute set to ``True`` on parameters that optimisers should not decay (the coefficients)."""


def _check_order(order: object) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    return order


def _check_param_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ValueError(f"parameter dtype {dtype} is not floating; valid: {FLOAT_DTYPES}")


def _check_impl(impl: str) -> str:
    if impl not in functional.available_impls():
        raise ValueError(f"unknown impl {impl!r}; valid: {', '.join(functional.available_impls())}")
    return impl


class _PolyBase(nn.Module):
    """Shared coefficients: ``weight [r]`` (init 1/r, ``weight[0]`` on power r), ``bias [1]`` (init 0)."""

    def __init__(self, order: int, impl: str, device=None, dtype=None) -> None:
        super().__init__()
        self.order = _check_order(order)
        self.impl = _check_impl(impl)
        _check_param_dtype(dtype)
        self.weight = nn.Parameter(torch.empty(self.order, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.register_parameter("prelu_weight", None)  # only PolyCom(rho="prelu") learns a slope
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Restore the paper's init: ``weight = 1/r``, ``bias = 0``."""
        with torch.no_grad():
            self.weight.fill_(1.0 / self.order)
            self.bias.zero_()
        for p in self.parameters(recurse=False):
            setattr(p, NO_WEIGHT_DECAY, True)

    def extra_repr(self) -> str:
        return f"order={self.order}, impl={self.impl!r}"


class PolyReLU(_PolyBase):
    """PolyReLU (type I, rho = ReLU): ``y = sum_j weight[j] * relu(x) ** (r - j) + bias``.

    Element-wise; ``x: [..., d] -> [..., d]``. Order 3 is the paper's:
    ``y = w0*relu(x)^3 + w1*relu(x)^2 + w2*relu(x) + b``.
    """

    def __init__(self, order: int = 3, impl: str = "auto", device=None, dtype=None) -> None:
        super().__init__(order, impl, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.poly_relu(x, self.weight, self.bias, impl=self.impl)


class PolyNorm(_PolyBase):
    """PolyNorm (type II, rho = RMS norm): ``y = sum_j weight[j] * N(x ** (r - j)) + bias``.

    ``N(u) = u / sqrt(mean(u**2, -1) + eps)`` over the last dim, no gain; ``x: [..., d] -> [..., d]``.
    Order 3 is the paper's: ``y = w0*N(x^3) + w1*N(x^2) + w2*N(x) + b``.
    """

    def __init__(
        self, order: int = 3, eps: float = DEFAULT_EPS, impl: str = "auto", device=None, dtype=None
    ) -> None:
        super().__init__(order, impl, device, dtype)
        reference.check_eps(eps)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.poly_norm(x, self.weight, self.bias, eps=self.eps, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


class PolyCom(_PolyBase):
    """General PolyCom of order ``r`` with composition function ``rho``; ``[..., d] -> [..., d]``.

    * ``composition="type1"``: ``y = sum_j weight[j] * rho(x) ** (r - j) + bias``
    * ``composition="type2"``: ``y = sum_j weight[j] * rho(pre(x) ** (r - j)) + bias``

    ``rho`` in ``relu, norm, l2norm, prelu, sigmoid, silu, tanh, gelu, identity``. With
    ``rho="prelu"`` the module also learns the negative slope ``prelu_weight`` (shape [1],
    init 0.25, as ``nn.PReLU``). ``PolyCom(rho="relu")`` and ``PolyCom(rho="norm",
    composition="type2")`` are PolyReLU and PolyNorm, with the same state dict.
    """

    def __init__(
        self,
        order: int = 3,
        rho: str = "relu",
        composition: str = "type1",
        pre: str = "identity",
        eps: float = DEFAULT_EPS,
        impl: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        reference.check_composition(rho, composition, pre)
        reference.check_eps(eps)
        super().__init__(order, impl, device, dtype)
        self.rho, self.composition, self.pre, self.eps = rho, composition, pre, float(eps)
        if rho == "prelu":
            self.prelu_weight = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Restore the paper's init (``weight = 1/r``, ``bias = 0``) and PReLU slope 0.25."""
        if self.prelu_weight is not None:
            with torch.no_grad():
                self.prelu_weight.fill_(0.25)
        super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.polycom(
            x,
            self.weight,
            self.bias,
            rho=self.rho,
            composition=self.composition,
            pre=self.pre,
            eps=self.eps,
            prelu_slope=self.prelu_weight,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        pre = f", pre={self.pre!r}" if self.pre != "identity" else ""
        return f"{super().extra_repr()}, rho={self.rho!r}, composition={self.composition!r}{pre}"


class ReLU2(nn.Module):
    """Squared ReLU (Primer): ``y = relu(x) ** 2``; ``[..., d] -> [..., d]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


_GATE_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
}


class GatedActivation(nn.Module):
    """Gated linear unit on a fused up-projection: ``y = gate_fn(g) * u`` with ``[g | u] = x``.

    ``x: [..., 2h] -> [..., h]``: the first half of the last dim is the gate, the second half
    the value (SwiGLU: ``gate_fn = silu``; GeGLU: ``gate_fn = gelu``).
    """

    def __init__(self, gate: str = "silu") -> None:
        super().__init__()
        if gate not in _GATE_FUNCTIONS:
            raise ValueError(f"unknown gate {gate!r}; valid: {', '.join(_GATE_FUNCTIONS)}")
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:
            raise ValueError(f"gated activation needs an even last dim [gate | up], got {x.shape[-1]}")
        g, u = x.chunk(2, dim=-1)
        return _GATE_FUNCTIONS[self.gate](g) * u

    def extra_repr(self) -> str:
        return f"gate={self.gate!r}"


@dataclass(frozen=True)
class ActivationSpec:
    """What an activation is and what an MLP built around it needs.

    ``num_up_projections`` is 1 (``down(act(up(x)))``) or 2 (gated: ``down(act([gate|up](x)))``).
    ``options`` are the keyword arguments ``build`` accepts (besides ``device`` / ``dtype`` for
    activations with parameters).
    """

    name: str
    summary: str
    build: Callable[..., nn.Module]
    num_up_projections: int = 1
    options: tuple[str, ...] = ()
    has_parameters: bool = False

    @property
    def gated(self) -> bool:
        return self.num_up_projections == 2

    def hidden_width(self, base_width: int, multiple_of: int = 1) -> int:
        """Parameter-matched FFN width for this activation.

        ``base_width`` is the width of the two-matrix MLP (``up: d -> h``, ``down: h -> d``);
        an MLP with ``n`` up-projections has ``(n + 1) * d * h`` weights, so the matched width
        is ``base_width * 2 / (n + 1)`` (gated: 2/3), rounded to the nearest multiple of
        ``multiple_of`` (ties round up). Example: ``8256 -> 5504`` for SwiGLU.
        """
        for label, value in (("base_width", base_width), ("multiple_of", multiple_of)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        exact = base_width * 2 / (self.num_up_projections + 1)
        return max(multiple_of, int(exact / multiple_of + 0.5) * multiple_of)

    def up_features(self, hidden: int) -> int:
        """Output features of the (fused) up-projection: ``num_up_projections * hidden``."""
        return self.num_up_projections * hidden


def _spec(name, summary, build, **kw) -> ActivationSpec:
    return ActivationSpec(name=name, summary=summary, build=build, **kw)


_POLY_OPTIONS = ("order", "impl")
ACTIVATIONS: dict[str, ActivationSpec] = {
    s.name: s
    for s in (
        _spec("relu", "max(x, 0)", lambda: nn.ReLU()),
        _spec(
            "gelu",
            "exact GELU x*Phi(x)",
            lambda approximate="none": nn.GELU(approximate),
            options=("approximate",),
        ),
        _spec("gelu_tanh", "GELU, tanh approximation", lambda: nn.GELU("tanh")),
        _spec("relu2", "squared ReLU relu(x)^2", ReLU2),
        _spec("silu", "x * sigmoid(x)", lambda: nn.SiLU()),
        _spec(
            "swiglu",
            "silu(g) * u (gated, 2 up-projections)",
            lambda: GatedActivation("silu"),
            num_up_projections=2,
        ),
        _spec(
            "geglu",
            "gelu(g) * u (gated, 2 up-projections)",
            lambda: GatedActivation("gelu"),
            num_up_projections=2,
        ),
        _spec(
            "polyrelu",
            "sum_i a_i relu(x)^i (PolyCom type I)",
            PolyReLU,
            options=_POLY_OPTIONS,
            has_parameters=True,
        ),
        _spec(
            "polynorm",
            "sum_i a_i N(x^i) (PolyCom type II, RMS norm)",
            PolyNorm,
            options=(*_POLY_OPTIONS, "eps"),
            has_parameters=True,
        ),
        _spec(
            "polycom",
            "general PolyCom: any order, rho, composition",
            PolyCom,
            options=(*_POLY_OPTIONS, "rho", "composition", "pre", "eps"),
            has_parameters=True,
        ),
        _spec(
            "polyprelu",
            "sum_i a_i prelu(x)^i (ablation)",
            lambda **kw: PolyCom(rho="prelu", composition="type1", **kw),
            options=_POLY_OPTIONS,
            has_parameters=True,
        ),
        _spec(
            "polyrelunorm",
            "sum_i a_i N(relu(x)^i) (ablation)",
            lambda **kw: PolyCom(rho="norm", composition="type2", pre="relu", **kw),
            options=(*_POLY_OPTIONS, "eps"),
            has_parameters=True,
        ),
    )
}


def get_activation_spec(name: str) -> ActivationSpec:
    """The :class:`ActivationSpec` registered under ``name`` (``ValueError`` listing valid names)."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def build_activation(name: str, *, device=None, dtype=None, **options) -> nn.Module:
    """Build the activation module registered under ``name``.

    ``build_activation("polynorm")``, ``build_activation("polyrelu", order=4)``,
    ``build_activation("polycom", rho="tanh", composition="type2")``. ``device`` / ``dtype``
    place the coefficients of parametric activations and are ignored by the others.
    """
    spec = get_activation_spec(name)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(spec.options) or "none"
        raise ValueError(f"activation {name!r} got unknown option(s) {unknown}; valid options: {valid}")
    if spec.has_parameters:
        return spec.build(device=device, dtype=dtype, **options)
    return spec.build(**options)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters optimisers should not decay: PolyCom coefficients (official code).

    Found both by the ``_no_weight_decay`` tag and by walking PolyCom modules, because wrappers
    such as FSDP2 replace parameter objects (dropping Python attributes) but keep module types.
    """
    tagged = {name for name, p in model.named_parameters() if getattr(p, NO_WEIGHT_DECAY, False)}
    owned = {
        f"{prefix}.{pname}" if prefix else pname
        for prefix, module in iter_polycom_modules(model)
        for pname, _ in module.named_parameters(recurse=False)
    }
    return tagged | owned


def iter_polycom_modules(model: nn.Module) -> Iterator[tuple[str, _PolyBase]]:
    """``(name, module)`` for every PolyCom activation inside ``model``."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, _PolyBase))
