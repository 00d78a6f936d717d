"""Model configs and presets: validation, JSON round trip, meta-device parameter counts."""

import json

import pytest
import torch

from polycom.cli import main
from polycom.models import ModelConfig, MoEConfig, Transformer, count_params, get_preset, list_presets


def test_presets_are_listed_and_built():
    names = list_presets()
    assert names == ["tiny", "small", "medium", "moe-tiny", "moe-small", "dense-1b", "moe-1b-7b"]
    for name in names:
        cfg = get_preset(name)
        assert isinstance(cfg, ModelConfig)
        assert (cfg.moe is not None) == name.startswith("moe")


def test_overrides_apply_and_merge_moe_fields():
    cfg = get_preset("tiny", activation="polyrelu", vocab_size=512)
    assert (cfg.activation, cfg.vocab_size, cfg.d_model) == ("polyrelu", 512, 128)
    moe = get_preset("moe-1b-7b", moe={"top_k": 4, "coefficients": "per_expert"}).moe
    assert (moe.num_experts, moe.top_k, moe.coefficients) == (64, 4, "per_expert")
    assert get_preset("tiny", moe={"num_experts": 4, "top_k": 1}).moe == MoEConfig(num_experts=4, top_k=1)


def test_config_round_trips_through_json():
    for name in ("tiny", "moe-small"):
        cfg = get_preset(name, activation="polycom", activation_kwargs={"rho": "tanh", "order": 2})
        again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg and isinstance(again.moe, (MoEConfig, type(None)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_heads": 5}, "n_heads=5 does not divide d_model=128"),
        ({"n_kv_heads": 3}, "n_kv_heads=3 does not divide n_heads=4"),
        ({"activation": "tanhh"}, "unknown activation 'tanhh'; valid: relu"),
        ({"activation_kwargs": {"order": 0}}, "order must be an integer >= 1"),
        ({"activation_kwargs": {"rho": "relu"}}, "unknown option(s) ['rho']"),
        ({"d_model": 0}, "d_model must be an integer >= 1, got 0"),
        ({"vocab_size": -3}, "vocab_size must be an integer >= 1, got -3"),
        ({"ffn_base_width": 1.5}, "ffn_base_width must be an integer >= 1, got 1.5"),
        ({"rope_theta": 0.0}, "rope_theta must be a finite number > 0"),
        ({"init": "xavier"}, "init must be one of dense, moe; got 'xavier'"),
        ({"moe": {"num_experts": 4, "top_k": 5}}, "moe.top_k=5 exceeds moe.num_experts=4"),
        ({"moe": {"coefficients": "global"}}, "moe.coefficients must be one of shared, per_expert"),
        ({"moe": {"lb_loss_weight": -1}}, "moe.lb_loss_weight must be a number >= 0"),
        ({"moe": {"top_kk": 1}}, "unknown MoEConfig field(s) ['top_kk']; valid: num_experts"),
        ({"d_modle": 64}, "unknown ModelConfig field(s) ['d_modle']; valid: vocab_size"),
    ],
)
def test_invalid_configs_fail_at_construction(overrides, message):
    with pytest.raises(ValueError) as info:
        get_preset("tiny", **overrides)
    assert message in str(info.value)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'huge'; valid: tiny, small, medium"):
        get_preset("huge")


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['colour'\]"):
        ModelConfig.from_dict({**get_preset("tiny").to_dict(), "colour": 1})
    data = get_preset("moe-tiny").to_dict()
    data["moe"]["experts"] = 3
    with pytest.raises(ValueError, match=r"unknown MoEConfig field\(s\) \['experts'\]"):
        ModelConfig.from_dict(data)


def test_dense_1b_counts_match_the_paper_model():
    cfg = get_preset("dense-1b", activation="polynorm")
    total, non_embedding = count_params(cfg), count_params(cfg, non_embedding=True)
    # 24 x (attention 4 d^2 + MLP 2 d 8256 + 2 norms d + 4 PolyNorm coefficients) + final norm d
    assert non_embedding == 24 * (4 * 2048**2 + 2 * 2048 * 8256 + 2 * 2048 + 4) + 2048 == 1_214_351_456
    assert total == non_embedding + 2 * 32000 * 2048 == 1_345_423_456
    assert count_params(cfg, active=True) == total
    assert abs(total / 1.345e9 - 1) < 1e-3 and abs(non_embedding / 1.214e9 - 1) < 1e-3


def test_moe_1b_7b_counts_match_olmoe():
    cfg = get_preset("moe-1b-7b", activation="polynorm")
    total, active = count_params(cfg), count_params(cfg, active=True)
    experts = 64 * 2 * 2048 * 1536
    other = 4 * 2048**2 + 64 * 2048 + 2 * 2048 + 2 * 128 + 4  # attention, router, norms, QK-norm, PolyNorm
    assert total == 16 * (experts + other) + 2048 + 2 * 50304 * 2048
    assert active == total - 16 * experts * 56 // 64
    assert 6.85e9 < total < 6.95e9 and 1.25e9 < active < 1.32e9
    per_expert = get_preset("moe-1b-7b", moe={"coefficients": "per_expert"})
    # 4 coefficients per expert instead of per layer; a token uses 8 of the 64 experts' sets
    assert count_params(per_expert) == total - 16 * 4 + 16 * 64 * 4
    assert count_params(per_expert, active=True) == active - 16 * 4 + 16 * 8 * 4


@pytest.mark.parametrize(
    "name", ["tiny", "small", "medium", "moe-tiny", "moe-small", "dense-1b", "moe-1b-7b"]
)
def test_swiglu_and_polynorm_are_parameter_matched(name):
    for kind in ({}, {"non_embedding": True}, {"active": True}):
        swiglu = count_params(get_preset(name, activation="swiglu"), **kind)
        polynorm = count_params(get_preset(name, activation="polynorm"), **kind)
        assert abs(swiglu - polynorm) / polynorm < 1e-3


def test_ladder_sizes():
    assert 1e6 <= count_params(get_preset("tiny")) <= 3e6
    assert 10e6 <= count_params(get_preset("small")) <= 20e6
    assert 80e6 <= count_params(get_preset("medium")) <= 120e6
    tiny_moe = get_preset("moe-tiny")
    assert count_params(tiny_moe, active=True) < count_params(tiny_moe)


def test_count_equals_a_real_models_parameters():
    for name in ("tiny", "moe-tiny"):
        cfg = get_preset(
            name, activation="polynorm", moe={"coefficients": "per_expert"} if "moe" in name else None
        )
        model = Transformer(cfg)
        assert model.num_params() == sum(p.numel() for p in model.parameters())
        embeddings = model.embed.weight.numel() + model.lm_head.weight.numel()
        assert model.num_params(non_embedding=True) == model.num_params() - embeddings
    tied = get_preset("tiny", tie_embeddings=True)
    assert count_params(tied) == count_params(get_preset("tiny")) - 4096 * 128


def test_num_params_allocates_nothing():
    model = Transformer(get_preset("tiny", vocab_size=64, d_model=32, n_heads=2, ffn_base_width=96))
    with torch.device("meta"):
        big = Transformer(get_preset("moe-1b-7b"))
    assert all(p.is_meta for p in big.parameters())
    assert big.num_params(active=True) == count_params(get_preset("moe-1b-7b"), active=True)
    assert not any(p.is_meta for p in model.parameters())


def test_presets_command_prints_counts(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "1,345,423,456" in out and "1,214,351,456" in out and "moe-1b-7b" in out
    assert main(["presets", "--activation", "swiglu"]) == 0
    assert "swiglu" in capsys.readouterr().out
    assert main(["presets", "--activation", "nope"]) == 2
    assert "unknown activation 'nope'" in capsys.readouterr().err
