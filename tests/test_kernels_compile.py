"""The fused ops under torch.compile: one graph (no break), same values and gradients as eager."""

import pytest
import torch
from torch import nn

from polycom import PolyNorm, PolyReLU
from polycom.ops import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="fused CPU kernels could not be built")


def mlp(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), act, nn.Linear(48, 16))


@pytest.mark.parametrize("act", [PolyNorm, PolyReLU])
def test_no_graph_break(act):
    torch._dynamo.reset()
    model = mlp(act(impl="cpu"))
    explanation = torch._dynamo.explain(model)(torch.randn(4, 5, 16))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_step_matches_eager(backend):
    torch._dynamo.reset()
    x = torch.randn(3, 7, 16)
    eager, compiled = mlp(PolyNorm(impl="auto")), mlp(PolyNorm(impl="auto"))
    step = torch.compile(compiled, backend=backend, fullgraph=True)
    eager(x).square().mean().backward()
    y = step(x)
    y.square().mean().backward()
    torch.testing.assert_close(y, eager(x))
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
