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


def test_inductor_reads_huge_page_outputs_through_views():
    """Outputs >= 16 MiB are views at a storage offset (cpu.empty_output); inductor code that
    reshapes, slices and transposes them must read the same values as eager."""
    torch._dynamo.reset()
    act = PolyNorm(impl="cpu")

    def f(x):
        y = act(x)  # [2048, 2048] fp32 = 16 MiB: the huge-page path
        return (y.view(-1, 1024)[::3] * 2).sum() + y.t()[3, 5:9].sum()

    x = torch.randn(2048, 2048, requires_grad=True)
    y = act(x)  # the huge-page path backs the output with a larger (aligned) buffer
    assert cpu._madvise is None or y.untyped_storage().nbytes() > y.numel() * y.element_size()
    expected = f(x)
    expected.backward()
    grad = x.grad.clone()
    x.grad = None
    got = torch.compile(f, backend="inductor", fullgraph=True)(x)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(x.grad, grad)
