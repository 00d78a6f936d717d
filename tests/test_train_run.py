"""Training runs end to end on a slice of the embedded corpus: learning, exact resume after SIGKILL,
kills during a checkpoint write, torchrun DDP / FSDP2 equivalence and cross-world-size resume.

Every run is a real ``polycom train`` process (``torchrun`` for 2 ranks) with ``OMP_NUM_THREADS=1``,
so the runs that are compared bit for bit share one thread setting.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from polycom.data import prepare_data, unigram_entropy
from polycom.train import TrainingStopped, build_config, loop
from polycom.train import checkpoint as ckpt
from polycom.train.metrics import read_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS = 20
COMMON = [
    "--max-steps", str(STEPS), "--checkpoint-every", "5", "--optim.lr", "3e-3", "--data.seq_len", "32",
    "--data.batch_size", "8", "--run.eval_batches", "2", "--run.progress", "false",
]  # fmt: skip


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """A ~1.5 MB slice of the stdlib corpus, BPE vocab 512, prepared once for every training test."""
    cache = tmp_path_factory.getbasetemp() / "train-data-cache"
    return prepare_data("stdlib", vocab_size=512, max_bytes=1_500_000, cache_dir=cache)


def train_command(data: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, "-m", "polycom.cli", "train", "--data", str(data), "--out", str(out), *COMMON, *extra]


def run_train(data: Path, out: Path, *extra: str, nproc: int = 1, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        train_command(data, out, *extra, nproc=nproc), env=env or ENV, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(out / "metrics.jsonl")}


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true; fail if it ends (or hangs) before that."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended before the kill point:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def reference(train_data, tmp_path_factory) -> Callable[[str], Path]:
    """Uninterrupted single-process runs, dense and MoE, built on demand."""
    runs: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in runs:
            out = tmp_path_factory.mktemp(f"reference-{preset}")
            run_train(train_data, out, "--preset", preset)
            runs[preset] = out
        return runs[preset]

    return get


# ----------------------------------------------------------------------------------- learning


def test_tiny_run_learns_well_below_the_unigram_baseline(train_data, tmp_path):
    out = tmp_path / "run"
    args = ["--max-steps", "60", "--data.seq_len", "64", "--data.batch_size", "16", "--run.eval_batches", "4"]
    proc = run_train(train_data, out, *args)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unigram_baseline"] == pytest.approx(unigram_entropy(train_data))
    assert summary["val_loss"] < summary["unigram_baseline"] - 0.5, summary
    assert "vs unigram baseline" in proc.stderr
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 61))
    for key in ("loss", "tokens", "lr", "grad_norm", "tokens_per_s", "mfu", "aux_loss"):
        assert key in rows[-1]
    assert rows[-1]["tokens"] == 60 * 16 * 64 and "val_loss" in rows[-1]
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["vocab_size"] == 512 and config["data"]["seq_len"] == 64
    assert (out / "model.safetensors").is_file()


# -------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("preset", ["tiny", "moe-tiny"])
def test_sigkill_mid_training_then_resume_is_bitwise_identical(preset, train_data, reference, tmp_path):
    expected = losses(reference(preset))
    out = tmp_path / "run"
    first = out / "checkpoints" / "step_00000005" / ckpt.COMPLETE
    proc = subprocess.Popen(
        train_command(train_data, out, "--preset", preset), env=ENV, stderr=subprocess.PIPE, text=True
    )
    kill_when(proc, first.is_file)
    assert max(losses(out), default=0) < STEPS  # it really died mid-run
    proc = run_train(train_data, out, "--preset", preset, "--resume", "auto")
    assert "resume: loaded" in proc.stderr and "step 5" in proc.stderr
    assert losses(out) == expected  # every step, before and after the kill, bit for bit


def test_kill_during_checkpoint_write_leaves_nothing_resumable(train_data, reference, tmp_path):
    out = tmp_path / "run"
    env = {**ENV, ckpt.PAUSE_ENV: "120@10"}  # the step-10 writer stops before its commit
    proc = subprocess.Popen(
        train_command(train_data, out, "--preset", "tiny"), env=env, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []

    def paused() -> bool:
        lines.append(proc.stderr.readline())
        return "checkpoint: test pause" in lines[-1]

    kill_when(proc, paused)
    half = out / "checkpoints" / ".tmp-step_00000010"
    assert (half / "state" / ".metadata").is_file() and not (half / ckpt.COMPLETE).exists()
    assert not (out / "checkpoints" / "step_00000010").exists()
    assert ckpt.find_checkpoint("auto", out).name == "step_00000005"
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.find_checkpoint(str(half), out)
    run_train(train_data, out, "--preset", "tiny", "--resume", "auto")
    assert losses(out) == losses(reference("tiny"))
    assert not half.exists()  # the next save removed the leftover


# --------------------------------------------------------------------------------- distributed


def assert_close_curves(got: dict[int, float], expected: dict[int, float], steps) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        assert abs(got[step] - expected[step]) <= 1e-4 * abs(expected[step]), (
            step,
            got[step],
            expected[step],
        )


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_two_ranks_match_one_process_and_resume_elsewhere(parallel, train_data, reference, tmp_path):
    expected = losses(reference("tiny"))
    out = tmp_path / parallel
    run_train(train_data, out, "--run.parallel", parallel, nproc=2)
    assert_close_curves(losses(out), expected, range(1, STEPS + 1))
    step15 = out / "checkpoints" / "step_00000015"
    assert json.loads((step15 / "trainer.json").read_text())["world_size"] == 2
    # the 2-rank checkpoint continues on 1 process
    single = tmp_path / "resumed-on-1"
    run_train(train_data, single, "--resume", str(step15))
    assert_close_curves(losses(single), expected, range(16, STEPS + 1))
    # the consolidated export of the sharded model has the single-process names, shapes and values
    from safetensors.torch import load_file

    mine, theirs = load_file(out / "model.safetensors"), load_file(reference("tiny") / "model.safetensors")
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(mine[name], tensor, rtol=1e-3, atol=1e-4, msg=name)
    if parallel == "fsdp":  # and a 1-process checkpoint continues on 2 FSDP ranks
        double = tmp_path / "resumed-on-2"
        resume = reference("tiny") / "checkpoints" / "step_00000015"
        run_train(train_data, double, "--run.parallel", "fsdp", "--resume", str(resume), nproc=2)
        assert_close_curves(losses(double), expected, range(16, STEPS + 1))


# ------------------------------------------------------------------------------------- errors


def test_bad_input_gets_one_line_errors(train_data, tmp_path, capsys):
    from polycom.cli import main

    def error_of(*argv: str) -> str:
        assert main(["train", "--out", str(tmp_path / "never"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("polycom train: error: ") and err.count("\n") == 1, err
        return err

    assert "does not exist" in error_of("--data", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    assert "empty" in error_of("--data", str(tmp_path / "empty")).lower()
    err = error_of("--data", str(train_data), "--data.seq_len", "300")
    assert "data.seq_len=300 is larger than the model's max_seq_len=256" in err
    err = error_of("--data", str(train_data), "--model.vocab_size", "100")
    assert "model.vocab_size=100 is smaller than the tokenizer's vocabulary (512)" in err
    assert not (tmp_path / "never" / "checkpoints").exists()
    (tmp_path / "old" / "checkpoints" / "step_00000003").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "step_00000003" / ckpt.COMPLETE).write_text("{}")
    err = error_of("--data", str(train_data), "--out", str(tmp_path / "old"))
    assert "already holds checkpoints (latest step_00000003); pass --resume auto" in err


def test_vocab_too_large_for_uint16_shards(tmp_path, capsys):
    import tokenizers

    from polycom.cli import main

    table = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 70_000)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(table, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.save(str(tmp_path / "tokenizer.json"))
    docs = [{"text": " ".join(f"w{i}" for i in range(d, 70_000, 997))} for d in range(40)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    argv = ["train", "--data", str(tmp_path / "docs.jsonl"), "--tokenizer", str(tmp_path / "tokenizer.json")]
    argv += ["--data.shard_dtype", "uint16", "--data.cache_dir", str(tmp_path / "cache")]
    assert main(argv) == 2
    assert "too large for uint16 shards" in capsys.readouterr().err


@pytest.mark.parametrize(
    "policy, bad_step, factor, steps",
    [("skip", 3, float("nan"), 5), ("stop", 3, float("nan"), 5), ("spike-skip", 14, 10.0, 16)],
)
def test_anomalous_loss_skips_the_step_or_stops(
    policy, bad_step, factor, steps, train_data, tmp_path, monkeypatch
):
    """A NaN loss (``run.on_nonfinite``) or a 10x loss spike (``run.on_spike``) at step ``bad_step``."""
    real_loss, calls, optimizer_steps = loop.language_model_loss, [], []

    def bad_loss_once(logits, targets):
        calls.append(1)
        loss = real_loss(logits, targets)
        return loss * factor if len(calls) == bad_step else loss

    real_step = torch.optim.AdamW.step

    def counted_step(self, *args, **kwargs):
        optimizer_steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(loop, "language_model_loss", bad_loss_once)
    monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
    settings = {"data.source": str(train_data), "run.out": str(tmp_path), "run.max_steps": str(steps),
                "data.seq_len": "32", "data.batch_size": "4", "run.eval_batches": "1",
                "run.progress": "false"}  # fmt: skip
    if policy == "spike-skip":
        settings["run.on_spike"] = "skip"
    else:
        settings["run.on_nonfinite"] = policy
    config = build_config("tiny", list(settings.items()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if policy != "stop":
            loop.train(config)
        else:
            with pytest.raises(TrainingStopped, match="stopped at step 3: nonfinite-stop"):
                loop.train(config)
    finally:
        torch.set_num_threads(threads)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    if policy == "spike-skip":  # 13 accepted losses before it, so the detector is armed
        assert rows[bad_step - 1]["anomaly"] == "spike-skip" and len(optimizer_steps) == steps - 1
        assert [r.get("anomaly") for r in rows].count("spike-skip") == 1
        return
    assert rows[2]["anomaly"] == f"nonfinite-{policy}" and rows[2]["loss"] is None
    if policy == "skip":
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and len(optimizer_steps) == 4
        assert all(r.get("anomaly") is None for r in rows[3:]) and rows[-1]["loss"] < rows[0]["loss"]
    else:
        assert len(rows) == 3 and len(optimizer_steps) == 2 and ckpt.find_checkpoint("auto", tmp_path) is None


def test_gradient_accumulation_matches_one_big_batch(train_data, tmp_path):
    curves = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for accum in (1, 4):
            settings = {"data.source": str(train_data), "run.out": str(tmp_path / f"accum{accum}"),
                        "run.max_steps": "4", "data.seq_len": "32", "data.batch_size": "8",
                        "data.grad_accum": str(accum), "run.eval_batches": "1",
                        "run.progress": "false"}  # fmt: skip
            loop.train(build_config("tiny", list(settings.items())))
            curves[accum] = losses(tmp_path / f"accum{accum}")
    finally:
        torch.set_num_threads(threads)
    assert_close_curves(curves[4], curves[1], range(1, 5))
    bad = [("data.source", str(train_data)), ("data.grad_accum", "3"), ("run.out", str(tmp_path / "bad"))]
    with pytest.raises(ValueError, match="batch_size=16 is not divisible by world_size x grad_accum = 1 x 3"):
        loop.train(build_config("tiny", bad))
