"""The transformer: outputs, causality, KV-cache generation, sampling, GQA, initialisation."""

import math

import pytest
import torch

from polycom import no_weight_decay_names
from polycom.models import KVCache, ModelOutput, Transformer, get_preset
from polycom.models import layers as layers_module
from polycom.models.generation import filter_logits, next_token

VOCAB = 96
TINY = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, ffn_base_width=96, max_seq_len=32)
MOE = {"num_experts": 4, "top_k": 2}


pytestmark = pytest.mark.usefixtures("single_thread")  # see conftest.py


def tiny_model(moe: dict | None = None, seed: int = 0, **overrides) -> Transformer:
    """A 2-layer d=32 model; ``moe`` (MoEConfig fields) makes it a mixture of experts."""
    torch.manual_seed(seed)
    if moe is None:
        return Transformer(get_preset("tiny", **{**TINY, **overrides})).eval()
    return Transformer(get_preset("moe-tiny", **{**TINY, "moe": moe, **overrides})).eval()


def random_tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


VARIANTS = {
    "dense": {},
    "dense-gqa-qknorm-tied": {"n_kv_heads": 2, "qk_norm": True, "tie_embeddings": True},
    "dense-swiglu-mqa": {"activation": "swiglu", "n_kv_heads": 1},
    "moe": {"moe": MOE},
    "moe-per-expert-normalised": {
        "activation": "polyrelu",
        "moe": {**MOE, "coefficients": "per_expert", "normalize_gates": True},
    },
}


def build_variant(name: str, seed: int = 0) -> Transformer:
    return tiny_model(seed=seed, **VARIANTS[name])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_shapes_and_aux_loss(variant):
    model = build_variant(variant)
    out = model(random_tokens(2, 12))
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (2, 12, VOCAB) and torch.isfinite(out.logits).all()
    assert out.aux_loss.dim() == 0
    if model.config.moe is None:
        assert out.aux_loss.item() == 0.0 and out.metrics == {}
    else:
        assert out.aux_loss.item() > 0 and set(out.metrics) == {"lb_loss", "z_loss"}
        assert all(isinstance(v, float) for v in out.metrics.values())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causality_future_tokens_never_change_earlier_logits(variant):
    model = build_variant(variant)
    tokens = random_tokens(2, 16)
    base = model(tokens).logits
    for t in (3, 9, 15):
        changed = tokens.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.arange(16 - t)) % VOCAB
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-5)
        assert not torch.allclose(logits[:, t], base[:, t])  # the change itself is visible


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_generation_equals_full_recompute(variant):
    model = build_variant(variant)
    prompt = random_tokens(3, 5)
    cached = model.generate(prompt, max_new_tokens=20)
    recomputed = model.generate(prompt, max_new_tokens=20, use_cache=False)
    assert cached.shape == (3, 25)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("variant", ["dense-gqa-qknorm-tied", "moe"])
def test_chunked_prefill_through_the_cache_matches_one_pass(variant):
    """Feeding a sequence in chunks (multi-token chunks after a cache use an explicit mask)."""
    model = build_variant(variant)
    tokens = random_tokens(2, 20)
    full = model(tokens).logits
    cache = KVCache(model.config, batch_size=2, max_len=20)
    chunks = [model(chunk, cache=cache).logits for chunk in tokens.split([7, 1, 5, 7], dim=1)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 20


def test_gqa_without_sdpa_broadcast_gives_the_same_logits(monkeypatch):
    model = build_variant("dense-gqa-qknorm-tied")
    tokens = random_tokens(2, 10)
    monkeypatch.setattr(layers_module, "_SDPA_HAS_GQA", True)
    native = model(tokens).logits
    monkeypatch.setattr(layers_module, "_SDPA_HAS_GQA", False)
    torch.testing.assert_close(model(tokens).logits, native, rtol=1e-5, atol=1e-6)


def test_attention_matches_an_explicit_softmax_reference():
    """One layer's attention against ``softmax(q k^T / sqrt(D) + causal) v`` written out by hand."""
    model = tiny_model(n_kv_heads=2, qk_norm=True)
    attn, cfg = model.layers[0].attn, model.config
    torch.nn.init.normal_(attn.q_norm.weight)  # make the QK-norm gains matter
    x = torch.randn(2, 7, cfg.d_model)
    rope = layers_module.rope_angles(torch.arange(7), cfg.head_dim, cfg.rope_theta)
    got = attn(x, rope)

    def heads(proj, n):
        return proj(x).view(2, 7, n, cfg.head_dim).transpose(1, 2)

    q, k, v = heads(attn.q_proj, 4), heads(attn.k_proj, 2), heads(attn.v_proj, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = layers_module.apply_rope(q, *rope), layers_module.apply_rope(k, *rope)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, cfg.d_model))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_rope_rotation_depends_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        ci, si = layers_module.rope_angles(torch.tensor([i]), 16, 10000.0)
        cj, sj = layers_module.rope_angles(torch.tensor([j]), 16, 10000.0)
        return (layers_module.apply_rope(q, ci, si) * layers_module.apply_rope(k, cj, sj)).sum()

    torch.testing.assert_close(score(5, 2), score(103, 100), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4))
    cos, sin = layers_module.rope_angles(torch.tensor([7]), 16, 10000.0)
    torch.testing.assert_close(layers_module.apply_rope(q, cos, sin).norm(), q.norm())


def test_sampling_options():
    model = tiny_model()
    prompt = random_tokens(2, 4)
    greedy = model.generate(prompt, 10)
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 10, temperature=0.7, top_p=1e-6), greedy)
    draw = lambda seed: model.generate(
        prompt, 10, temperature=1.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), greedy)
    assert torch.equal(model.generate(prompt, 0), prompt)


def test_filter_logits_keeps_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, True, False, True]]
    # nucleus 0.7: 0.5 alone < 0.7, 0.5 + 0.3 reaches it -> keep {0, 2}
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, True, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.9)).tolist() == [[False, True, False, False]]
    assert next_token(logits).tolist() == [[0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 40}, "exceeds max_seq_len=32"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
        ({"max_new_tokens": 2, "temperature": -1.0}, "temperature must be >= 0"),
        ({"max_new_tokens": 2, "top_k": 0}, "top_k must be None or an integer >= 1"),
        ({"max_new_tokens": 2, "top_p": 1.5}, "top_p must be None or in (0, 1]"),
    ],
)
def test_generate_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError) as info:
        tiny_model().generate(random_tokens(1, 3), **kwargs)
    assert message in str(info.value)


def test_forward_rejects_bad_tokens():
    model = tiny_model()
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="33 positions exceeds max_seq_len=32"):
        model(random_tokens(1, 33))


def _std(t):
    return t.float().std().item()


def test_dense_init_recipe():
    cfg = get_preset("tiny", vocab_size=2048, d_model=256, n_layers=3, n_heads=4, ffn_base_width=768)
    model = Transformer(cfg)
    std = math.sqrt(2 / (5 * 256))
    for p in (model.embed.weight, model.lm_head.weight, model.layers[0].attn.q_proj.weight):
        assert abs(_std(p) / std - 1) < 0.03
    for p in (model.layers[1].attn.o_proj.weight, model.layers[2].mlp.down_proj.weight):
        assert abs(_std(p) / (std / math.sqrt(6)) - 1) < 0.03
    assert all(torch.equal(b.attn_norm.weight, torch.ones(256)) for b in model.layers)
    act = model.layers[0].mlp.act
    assert torch.equal(act.weight, torch.full((3,), 1 / 3)) and torch.equal(act.bias, torch.zeros(1))


def test_moe_init_recipe_is_truncated_normal():
    cfg = get_preset("moe-tiny", d_model=128, vocab_size=1024, moe={"num_experts": 8, "top_k": 2})
    model = Transformer(cfg)
    expected = 0.02 * 0.9866  # std of N(0, 1) truncated to [-3, 3] is 0.9866
    block = model.layers[0]
    for p in (
        model.embed.weight,
        block.mlp.w_up,
        block.mlp.w_down,
        block.mlp.router.weight,
        block.attn.o_proj.weight,
    ):
        assert p.abs().max().item() <= 0.06 + 1e-7
        assert abs(_std(p) / expected - 1) < 0.05
    assert torch.equal(block.attn.q_norm.weight, torch.ones(cfg.head_dim))


def test_meta_model_materialises_with_init_weights():
    cfg = get_preset("moe-tiny", **{**TINY, "moe": MOE})
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.layers[0].mlp.act.weight, torch.full((3,), 1 / 3))
    assert torch.equal(model.norm.weight, torch.ones(32))
    reference = tiny_model(moe=MOE)
    model.load_state_dict(reference.state_dict())
    tokens = random_tokens(2, 8)
    torch.testing.assert_close(model(tokens).logits, reference(tokens).logits)


def test_polycom_coefficients_use_the_official_layout_and_skip_weight_decay():
    dense, moe = tiny_model(), tiny_model(moe=MOE)
    assert "layers.0.mlp.act.weight" in dict(dense.named_parameters())
    assert no_weight_decay_names(dense) == {
        f"layers.{i}.mlp.act.{n}" for i in range(2) for n in ("weight", "bias")
    }
    assert no_weight_decay_names(moe) == {
        f"layers.{i}.mlp.act.{n}" for i in range(2) for n in ("weight", "bias")
    }


def test_flops_per_token_formula():
    model_cfg = get_preset("dense-1b")
    with torch.device("meta"):
        model = Transformer(model_cfg)
    n = 1_214_351_456 + 32000 * 2048
    assert model.flops_per_token() == 6 * n + 12 * 24 * 2048 * 4096
    assert model.flops_per_token(seq_len=1024) == 6 * n + 12 * 24 * 2048 * 1024


@pytest.mark.parametrize("moe", [False, True])
def test_bfloat16_forward_is_finite(moe):
    model = tiny_model(moe=MOE if moe else None).to(torch.bfloat16)
    out = model(random_tokens(2, 8))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert torch.isfinite(out.aux_loss)
    assert model.generate(random_tokens(2, 4), 6).shape == (2, 10)  # the cache takes the model's dtype


@pytest.mark.parametrize("moe", [False, True])
def test_autocast_forward_and_generation(moe):
    model = tiny_model(moe=MOE if moe else None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(random_tokens(2, 8))
        generated = model.generate(random_tokens(2, 4), 6)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert out.aux_loss.dtype == torch.float32 and generated.shape == (2, 10)
