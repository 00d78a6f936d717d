"""polycom: polynomial composition activations (PolyReLU, PolyNorm, PolyCom) for PyTorch.

Zhuo et al., "Polynomial Composition Activations: Unleashing the Dynamics of Large Language
Models", ICLR 2025 (arXiv 2411.03884).

>>> from polycom import PolyNorm
>>> act = PolyNorm()            # weight [3] = 1/3, bias [1] = 0, eps 1e-6 (official layout)
"""

from polycom.activations import (
    ACTIVATIONS,
    ActivationSpec,
    GatedActivation,
    PolyCom,
    PolyNorm,
    PolyReLU,
    ReLU2,
    build_activation,
    get_activation_spec,
    no_weight_decay_names,
)
from polycom.functional import poly_norm, poly_relu, polycom

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "ActivationSpec",
    "GatedActivation",
    "PolyCom",
    "PolyNorm",
    "PolyReLU",
    "ReLU2",
    "__version__",
    "build_activation",
    "get_activation_spec",
    "no_weight_decay_names",
    "poly_norm",
    "poly_relu",
    "polycom",
]
