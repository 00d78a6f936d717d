"""Training harness units: configs and overrides, optimiser groups, schedule, checkpoints, metrics."""

import json

import pytest
import torch

from polycom import no_weight_decay_names
from polycom.cli import main
from polycom.models import Transformer, get_preset
from polycom.train import checkpoint as ckpt
from polycom.train.config import RunConfig, TrainConfig, build_config, coerce, field_types
from polycom.train.distributed import DistInfo, resolve_parallel
from polycom.train.metrics import Progress, SpikeDetector, read_metrics, truncate_metrics
from polycom.train.optim import LRSchedule, build_optimizer, param_groups

ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), parallel="none")


# ------------------------------------------------------------------------------------ configs


def test_coercion_follows_the_annotations():
    run_types = field_types(RunConfig)
    assert coerce("k", "1e6", run_types["max_tokens"]) == 1_000_000
    assert coerce("k", "none", run_types["max_tokens"]) is None
    assert coerce("k", "yes", bool) is True and coerce("k", "0", bool) is False
    assert coerce("k", "0.9,0.99", tuple[float, float]) == (0.9, 0.99)
    assert coerce("k", '{"order": 4}', dict) == {"order": 4}
    with pytest.raises(ValueError, match="expects an integer"):
        coerce("--run.seed", "1.5", int)
    with pytest.raises(ValueError, match="expects true/false"):
        coerce("--run.compile", "maybe", bool)


def test_build_config_applies_dotted_overrides_and_round_trips():
    overrides = [
        ("model.activation", "polyrelu"),
        ("optim.lr", "2e-3"),
        ("optim.betas", "0.8,0.9"),
        ("schedule.decay", "linear"),
        ("data.seq_len", "64"),
        ("run.parallel", "fsdp"),
    ]
    config = build_config("tiny", overrides)
    assert config.model.activation == "polyrelu" and config.optim.lr == 2e-3
    assert config.optim.betas == (0.8, 0.9) and config.schedule.decay == "linear"
    assert config.data.seq_len == 64 and config.run.parallel == "fsdp"
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict()


def test_moe_overrides_and_their_errors():
    config = build_config("moe-tiny", [("model.moe.num_experts", "4"), ("model.moe.top_k", "1")])
    assert (config.model.moe.num_experts, config.model.moe.top_k) == (4, 1)
    with pytest.raises(ValueError, match="preset 'tiny' is dense"):
        build_config("tiny", [("model.moe.top_k", "1")])


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("optim.lrr", "--optim.lr"),
        ("model.activaton", "--model.activation"),
        ("run.max_step", "--run.max_steps"),
    ],
)
def test_unknown_key_suggests_the_closest(key, suggestion):
    with pytest.raises(ValueError, match=f"unknown config key --{key}; did you mean {suggestion}"):
        build_config("tiny", [(key, "1")])


def test_invalid_values_name_the_key_and_the_choices():
    with pytest.raises(
        ValueError, match="run.parallel='mpi' is not valid; choose one of auto, none, ddp, fsdp"
    ):
        build_config("tiny", [("run.parallel", "mpi")])
    with pytest.raises(ValueError, match="optim.lr must be > 0"):
        build_config("tiny", [("optim.lr", "-1")])
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        build_config("huge", [])


def test_resolve_parallel():
    assert resolve_parallel("auto", 1) == "none" and resolve_parallel("fsdp", 1) == "none"
    assert resolve_parallel("auto", 2) == "ddp" and resolve_parallel("fsdp", 4) == "fsdp"
    with pytest.raises(ValueError, match="WORLD_SIZE=2"):
        resolve_parallel("none", 2)


# ---------------------------------------------------------------------------------------- CLI


def test_dry_run_prints_config_sizes_and_memory(capsys):
    argv = ["train", "--dry-run", "--activation", "polyrelu", "--optim.lr=2e-3", "--max-steps", "7"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    resolved = json.loads(out[: out.index("\nparameters:")])
    assert resolved["model"]["activation"] == "polyrelu" and resolved["optim"]["lr"] == 2e-3
    assert resolved["run"]["max_steps"] == 7
    assert "parameters: " in out and "non-embedding" in out and "memory per device" in out


def test_cli_errors_are_one_line(capsys):
    assert main(["train", "--dry-run", "--optim.learning_rat", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key --optim.learning_rat" in err and err.count("\n") == 1
    assert main(["train", "--dry-run", "--data.seq_len", "512"]) == 2
    assert "data.seq_len=512 is larger than the model's max_seq_len=256" in capsys.readouterr().err


# ----------------------------------------------------------------------------- optimiser, LR


def test_param_groups_exclude_coefficients_norms_and_biases():
    model = Transformer(get_preset("tiny", vocab_size=64, activation="polynorm"))
    decay, no_decay = param_groups(model, 0.1)
    names = dict(model.named_parameters())
    assert set(decay["names"]) | set(no_decay["names"]) == set(names)
    assert all(names[n].ndim >= 2 for n in decay["names"]) and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0
    coefficients = no_weight_decay_names(model)
    assert len(coefficients) == 2 * 4 and coefficients <= set(no_decay["names"])  # weight + bias per layer
    assert "embed.weight" in decay["names"] and any("norm" in n for n in no_decay["names"])
    optimizer = build_optimizer(model, build_config("tiny", []).optim)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_schedule_warmup_then_cosine_or_linear_to_the_floor():
    from polycom.train.config import ScheduleConfig

    cos = LRSchedule.from_config(1.0, ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert (
        cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    )
    lin = LRSchedule.from_config(2.0, ScheduleConfig(warmup_steps=0, decay="linear", min_lr=0.5), 100)
    assert lin(0) == pytest.approx(2.0) and lin(50) == pytest.approx(1.25) and lin(100) == pytest.approx(0.5)
    assert LRSchedule.from_config(1.0, ScheduleConfig(decay="constant"), 100)(99) == 1.0
    assert LRSchedule.from_config(1.0, ScheduleConfig(), 100).warmup_steps == 5  # 5 % by default


# ------------------------------------------------------------------------------- checkpoints


def _tiny_model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = Transformer(get_preset("tiny", vocab_size=64, n_layers=1, d_model=32, n_heads=2))
    optimizer = build_optimizer(model, build_config("tiny", []).optim)
    model(torch.randint(0, 64, (2, 8))).logits.square().mean().backward()
    optimizer.step()
    return model, optimizer


def test_checkpoint_round_trip_keep_last_and_rng(tmp_path):
    model, optimizer = _tiny_model_and_optimizer(0)
    for step in (2, 4, 6):
        torch.manual_seed(100 + step)
        ckpt.save_checkpoint(tmp_path, step, model, optimizer, {"note": step}, ONE_PROCESS, keep_last=2)
    expected_draw = torch.rand(3)  # the draw that follows the RNG state saved at step 6
    folder = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(folder)] == ["step_00000004", "step_00000006"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    other, other_opt = _tiny_model_and_optimizer(1)
    state = ckpt.load_checkpoint(ckpt.find_checkpoint("auto", tmp_path), other, other_opt, ONE_PROCESS)
    assert state["step"] == 6 and state["note"] == 6 and state["rng_restored"]
    assert torch.equal(torch.rand(3), expected_draw)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    moments = [s["exp_avg_sq"] for s in optimizer.state.values()]
    assert all(
        torch.equal(a, s["exp_avg_sq"]) for a, s in zip(moments, other_opt.state.values(), strict=True)
    )


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "step_00000009").mkdir(parents=True)  # no COMPLETE marker
    (folder / ".tmp-step_00000012").mkdir()
    (folder / ".tmp-step_00000012" / ckpt.COMPLETE).write_text("{}")
    assert ckpt.find_checkpoint("auto", tmp_path) is None
    with pytest.raises(ValueError, match="checkpoint is incomplete"):
        ckpt.find_checkpoint(str(folder / "step_00000009"), tmp_path)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        ckpt.find_checkpoint(str(tmp_path), tmp_path)
    with pytest.raises(ValueError, match="no such path"):
        ckpt.find_checkpoint(str(tmp_path / "nope"), tmp_path)


# ----------------------------------------------------------------------------------- metrics


def test_spike_detector_needs_history_and_flags_large_jumps():
    spikes = SpikeDetector(factor=2.0, window=5, min_history=3)
    assert not spikes.is_spike(100.0)  # no history yet
    for loss in (1.0, 1.0, 1.0):
        spikes.accept(loss)
    assert spikes.is_spike(2.5) and not spikes.is_spike(1.9)
    spikes.accept(float("nan"))  # never enters the running mean
    assert spikes.running_mean() == 1.0
    restored = SpikeDetector(2.0, window=5, min_history=3)
    restored.load_state_dict(json.loads(json.dumps(spikes.state_dict())))
    assert restored.is_spike(2.5) and restored.running_mean() == 1.0


def test_truncate_metrics_keeps_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)))
    truncate_metrics(path, 4)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


def test_progress_line_has_eta(tmp_path):
    path = tmp_path / "progress.txt"
    with open(path, "w") as stream:
        progress = Progress(total=10, start=0, every=5, enabled=True, stream=stream)
        for step in range(1, 11):
            progress.update(step, "loss 1.0")
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[##########..........] 5/10 loss 1.0 |")
    assert " < " in lines[0] and lines[1].startswith("[####################] 10/10")
