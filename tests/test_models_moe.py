"""Mixture of experts: dropless routing against a per-token reference, aux losses, gates, gradients."""

import math

import pytest
import torch

from polycom.models import Transformer, get_preset
from polycom.models.moe import MoE, load_balancing_loss, route, router_z_loss

D, E = 32, 6


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py


def make_moe(activation="polynorm", top_k=2, coefficients="shared", normalize=False, impl="loop", seed=0):
    """A standalone MoE layer with a sharp random router and (if per-expert) distinct coefficients."""
    moe = {
        "num_experts": E,
        "top_k": top_k,
        "coefficients": coefficients,
        "normalize_gates": normalize,
        "expert_impl": impl,
    }
    cfg = get_preset("moe-tiny", d_model=D, n_heads=2, ffn_base_width=48, activation=activation, moe=moe)
    torch.manual_seed(seed)
    layer = MoE(cfg)
    with torch.no_grad():
        torch.nn.init.normal_(layer.router.weight, std=0.5)
        torch.nn.init.normal_(layer.w_up, std=D**-0.5)
        torch.nn.init.normal_(layer.w_down, std=0.1)
        for p in layer.act.parameters() if layer.per_expert_act else []:
            p.add_(torch.randn_like(p) * 0.2)
    return layer


def per_token_reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token at a time: ``y = sum_{e in topk(p)} g_e * down_e(act_e(up_e(x)))``."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        probs = torch.softmax(x[n] @ layer.router.weight.T, dim=-1)
        chosen = probs.topk(layer.top_k).indices
        gates = probs[chosen] / (probs[chosen].sum() if layer.normalize_gates else 1.0)
        for gate, e in zip(gates, chosen.tolist(), strict=True):
            act = layer.act[e] if layer.per_expert_act else layer.act
            hidden = act((x[n] @ layer.w_up[e]).unsqueeze(0)).squeeze(0)  # one token's full hidden vector
            out[n] += gate * (hidden @ layer.w_down[e])
    return out


CASES = [
    ("polynorm", 2, "shared", False),
    ("polynorm", 3, "per_expert", True),
    ("swiglu", 2, "shared", True),
    ("polyrelu", 1, "per_expert", False),
    ("gelu", 6, "shared", False),
]
IMPLS = ["loop"] + (["grouped_mm"] if hasattr(torch, "_grouped_mm") else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("activation", "top_k", "coefficients", "normalize"), CASES)
def test_moe_is_exactly_dropless_against_a_per_token_reference(
    activation, top_k, coefficients, normalize, impl
):
    layer = make_moe(activation, top_k, coefficients, normalize, impl)
    x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(1))
    got, _ = layer(x)
    expected = per_token_reference(layer, x.reshape(-1, D)).reshape(x.shape)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_token_is_dropped_when_every_token_picks_the_same_experts(impl):
    layer = make_moe(top_k=2, impl=impl)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[4, 0] = layer.router.weight[1, 0] = 50.0  # experts 4 and 1 win for x[..., 0] > 0
    x = torch.randn(24, D, generator=torch.Generator().manual_seed(2))
    x[:, 0] = x[:, 0].abs() + 1
    _, _, experts = route(x @ layer.router.weight.T, 2, False)
    assert set(experts.flatten().tolist()) == {1, 4}  # all 24 tokens on two of six experts
    got, _ = layer(x)
    torch.testing.assert_close(got, per_token_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_grouped_mm_and_loop_agree_in_forward_and_backward():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available in this torch")
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(3))
    grads = {}
    for impl in ("loop", "grouped_mm"):
        layer = make_moe("polynorm", 3, "per_expert", True, impl)
        y, losses = layer(x)
        ((y**2).sum() + losses.lb_loss).backward()
        grads[impl] = (y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()})
    torch.testing.assert_close(grads["grouped_mm"][0], grads["loop"][0], rtol=1e-5, atol=1e-5)
    for name, grad in grads["loop"][1].items():
        torch.testing.assert_close(grads["grouped_mm"][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_load_balancing_loss_equals_its_formula():
    torch.manual_seed(0)
    n, k = 50, 3
    logits = torch.randn(n, E) * 2
    probs, _, experts = route(logits, k, normalize_gates=False)
    # E * sum_e f_e * P_e, f_e = share of the n*k assignments routed to e, P_e = mean router prob of e
    f = [sum(int(e in experts[t].tolist()) for t in range(n)) / (n * k) for e in range(E)]
    p = [sum(probs[t, e].item() for t in range(n)) / n for e in range(E)]
    expected = E * sum(fe * pe for fe, pe in zip(f, p, strict=True))
    assert load_balancing_loss(probs, experts).item() == pytest.approx(expected, rel=1e-6)


def test_aux_losses_have_their_known_extremes():
    uniform_logits = torch.zeros(8, E)
    probs, _, experts = route(uniform_logits, 2, False)
    assert load_balancing_loss(probs, experts).item() == pytest.approx(1.0)  # sum_e f_e = 1
    assert router_z_loss(uniform_logits).item() == pytest.approx(math.log(E) ** 2)
    collapsed = torch.full((8, E), -30.0)
    collapsed[:, 2] = 30.0
    probs, _, experts = route(collapsed, 1, False)
    assert load_balancing_loss(probs, experts).item() == pytest.approx(E, rel=1e-5)
    logits = torch.randn(7, E)
    assert router_z_loss(logits).item() == pytest.approx(
        (logits.exp().sum(-1).log() ** 2).mean().item(), rel=1e-5
    )


@pytest.mark.parametrize("normalize", [True, False])
def test_gates_are_the_top_k_probabilities_and_sum_to_one_when_normalised(normalize):
    logits = torch.randn(20, E, generator=torch.Generator().manual_seed(4))
    probs, gates, experts = route(logits, 3, normalize)
    chosen = probs.gather(-1, experts)
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()  # the k largest, in order
    others = probs.scatter(-1, experts, -1.0)  # the experts not chosen
    assert (chosen.min(-1).values >= others.max(-1).values).all()
    if normalize:
        torch.testing.assert_close(gates.sum(-1), torch.ones(20))
        torch.testing.assert_close(gates, chosen / chosen.sum(-1, keepdim=True))
    else:
        torch.testing.assert_close(gates, chosen)
        assert (gates.sum(-1) < 1).all()


def test_model_aux_loss_is_the_weighted_mean_over_layers():
    cfg = get_preset("moe-tiny", vocab_size=64, d_model=32, n_layers=3, n_heads=2, ffn_base_width=48)
    cfg.moe.lb_loss_weight, cfg.moe.z_loss_weight = 0.5, 0.25
    torch.manual_seed(0)
    model = Transformer(cfg)
    seen = []
    for block in model.layers:
        block.mlp.register_forward_hook(lambda mod, inp, out: seen.append(out[1]))
    out = model(torch.randint(0, 64, (2, 10)))
    lb = sum(r.lb_loss.item() for r in seen) / 3
    z = sum(r.z_loss.item() for r in seen) / 3
    assert out.metrics["lb_loss"] == pytest.approx(lb, rel=1e-6)
    assert out.metrics["z_loss"] == pytest.approx(z, rel=1e-6)
    assert out.aux_loss.item() == pytest.approx(0.5 * lb + 0.25 * z, rel=1e-6)


@pytest.mark.parametrize("coefficients", ["shared", "per_expert"])
def test_gradients_reach_router_experts_and_coefficients(coefficients):
    cfg = get_preset(
        "moe-tiny",
        vocab_size=64,
        d_model=32,
        n_layers=1,
        n_heads=2,
        ffn_base_width=48,
        moe={
            "num_experts": 4,
            "top_k": 2,
            "lb_loss_weight": 0.0,
            "z_loss_weight": 0.0,
            "coefficients": coefficients,
        },
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, 64, (4, 16))
    out = model(tokens)
    torch.nn.functional.cross_entropy(out.logits.reshape(-1, 64), tokens.reshape(-1)).backward()
    moe = model.layers[0].mlp
    # the language-model loss alone (aux weights 0) reaches the router through the gates
    assert moe.router.weight.grad.abs().sum() > 0
    for e in range(4):
        assert moe.w_up.grad[e].abs().sum() > 0 and moe.w_down.grad[e].abs().sum() > 0
    for p in moe.act.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    model.zero_grad()  # the auxiliary losses reach the router too
    _, losses = moe(torch.randn(2, 5, 32))
    (losses.lb_loss + losses.z_loss).backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_router_runs_in_fp32_under_bf16(monkeypatch):
    layer = make_moe().to(torch.bfloat16)
    seen = []
    original = torch.nn.functional.linear

    def spy(x, w, *args):
        seen.append((x.dtype, w.dtype))
        return original(x, w, *args)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    y, losses = layer(torch.randn(2, 4, D, dtype=torch.bfloat16))
    assert seen == [(torch.float32, torch.float32)]  # the router is the layer's only F.linear
    assert y.dtype == torch.bfloat16 and losses.lb_loss.dtype == torch.float32


def test_grouped_mm_follows_autocast_like_the_loop():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available in this torch")
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(5))
    outputs = {}
    for impl in ("loop", "grouped_mm"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[impl], _ = make_moe("swiglu", 2, impl=impl)(x)
    assert outputs["grouped_mm"].dtype == outputs["loop"].dtype == torch.bfloat16
    torch.testing.assert_close(outputs["grouped_mm"], outputs["loop"], rtol=2e-2, atol=1e-2)
