"""The training loop: one linear function, :func:`train`, with its helpers beside it.

Per optimiser step ``s`` (0-based), every rank:

1. sets ``lr = schedule(s)``;
2. takes its ``batch_size / world_size`` windows of step ``s`` (a pure function of seed and step), in
   ``grad_accum`` micro-batches, and back-propagates ``(CE + aux) / grad_accum`` for each
   (``CE`` = mean next-token cross-entropy, ``aux`` = the model's weighted MoE losses);
3. averages the loss over ranks, clips the global gradient norm, and steps AdamW unless the loss or
   the norm is non-finite (or a spike) and the run is set to skip such steps;
4. logs a ``metrics.jsonl`` row, evaluates and checkpoints at their intervals.

Everything a step depends on (weights, optimiser moments, step number, spike history, RNG) is in
the checkpoint, so a resumed run repeats the uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from polycom.fileio import atomic_write_text
from polycom.train import checkpoint as ckpt
from polycom.train.config import TrainConfig, describe_differences
from polycom.train.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown_distributed,
    wrap_model,
)
from polycom.train.metrics import MetricsWriter, Progress, SpikeDetector, peak_flops, truncate_metrics
from polycom.train.optim import LRSchedule, build_optimizer, set_lr
from polycom.train.setup import (
    per_rank_micro_batch,
    prepare_run_data,
    resolve_model_and_seq_len,
    resolve_out_dir,
    total_steps,
    validation_windows,
)


class TrainingStopped(RuntimeError):
    """Raised (after logging and a final checkpoint is skipped) when ``on_nonfinite/on_spike=stop``."""


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    train_loss: float | None
    val_loss: float | None
    unigram_baseline: float | None
    seconds: float


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats): ``logits [B, T, V]`` (any float dtype), ``targets [B, T]``."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def autocast_context(config: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA (``dtype=auto``) or when asked; plain fp32 otherwise."""
    dtype = config.run.dtype
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(config: TrainConfig, info: DistInfo) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(model, forward_module)``: the same seeded full init on every rank, then DDP / FSDP2 / compile."""
    from polycom.models import Transformer

    ckpt.seed_everything(config.run.seed)
    model = Transformer(config.model).to(info.device)
    # Experts that received no token have no gradient; DDP must be told to expect that.
    forward = wrap_model(model, info, find_unused=config.model.moe is not None)
    if config.run.compile:
        forward = torch.compile(forward)
    return model, forward


# ---------------------------------------------------------------------------------------------
# Step, eval
# ---------------------------------------------------------------------------------------------


def gradient_sync(forward: torch.nn.Module, info: DistInfo, sync: bool):
    """Context for one micro-batch: reduce gradients over ranks only when ``sync`` (the last one)."""
    if info.parallel == "fsdp":
        forward.set_requires_gradient_sync(sync)
    elif info.parallel == "ddp" and not sync:
        return forward.no_sync()
    return contextlib.nullcontext()


def forward_backward(
    forward: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    config: TrainConfig,
    info: DistInfo,
) -> dict[str, float]:
    """Accumulate gradients over micro-batches; returns rank-averaged ``loss``, ``aux_loss`` and metrics."""
    n = len(batches)
    totals = torch.zeros(2, dtype=torch.float64)
    extra: dict[str, float] = {}
    for i, (inputs, targets) in enumerate(batches):
        with gradient_sync(forward, info, sync=i == n - 1):
            with autocast_context(config, info.device):
                out = forward(inputs.to(info.device, non_blocking=True))
                ce = language_model_loss(out.logits, targets.to(info.device, non_blocking=True))
                loss = ce + out.aux_loss
            (loss / n).backward()
        totals += torch.tensor([ce.item(), float(out.aux_loss)], dtype=torch.float64) / n
        for key, value in out.metrics.items():
            extra[key] = extra.get(key, 0.0) + float(value) / n
    keys = sorted(extra)
    stacked = torch.cat([totals, torch.tensor([extra[k] for k in keys], dtype=torch.float64)])
    reduced = all_reduce_mean(stacked.to(info.device)).cpu().tolist()
    row = {"loss": reduced[0], "aux_loss": reduced[1]}
    row.update(zip(keys, reduced[2:], strict=True))
    return row


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Global L2 norm of all gradients (before clipping); clips to ``max_norm`` when it is > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def evaluate(forward: torch.nn.Module, windows, config: TrainConfig, info: DistInfo) -> float:
    """Mean per-token validation cross-entropy over all ranks' windows (nats)."""
    forward.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for inputs, targets in windows:
        with autocast_context(config, info.device):
            logits = forward(inputs.to(info.device)).logits
        loss = language_model_loss(logits, targets.to(info.device))
        sums += torch.tensor([loss.item() * targets.numel(), targets.numel()], dtype=torch.float64)
    forward.train()
    total = all_reduce_mean(sums.to(info.device)).cpu()
    return float(total[0] / total[1])


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _say(info: DistInfo, text: str) -> None:
    if info.is_main:
        print(text, file=sys.stderr, flush=True)


def _resume(
    spec: str | None, out_dir: Path, config: TrainConfig, model, optimizer, info: DistInfo
) -> dict[str, Any] | None:
    """Load the checkpoint named by ``--resume`` (or none); refuse one made for another model."""
    if spec is None:
        return None
    path = broadcast_object(str(ckpt.find_checkpoint(spec, out_dir) or "") if info.is_main else None)
    if not path:
        _say(info, f"resume: no complete checkpoint in {out_dir / 'checkpoints'}; starting from scratch")
        return None
    saved = json.loads((Path(path) / "trainer.json").read_text())
    diffs = describe_differences(saved["config"]["model"], config.model.to_dict())
    if diffs:
        raise ValueError(f"--resume {path}: the checkpoint's model differs: {'; '.join(diffs)}")
    for line in describe_differences(saved["config"], config.to_dict()):
        if not line.startswith(("run.out:", "model.")):
            _say(info, f"resume: setting changed since the checkpoint: {line}")
    state = ckpt.load_checkpoint(Path(path), model, optimizer, info)
    _say(info, f"resume: loaded {path} (step {state['step']}, saved by {state['world_size']} process(es))")
    return state


def train(config: TrainConfig, resume: str | None = None) -> TrainResult:
    """Run (or continue, with ``resume`` = a path or ``"auto"``) the training described by ``config``."""
    info = init_distributed(config.run.parallel)
    try:
        result = _train(config, resume, info)
        # Leave together: a rank that tears gloo down while another still talks to it can abort.
        barrier()
        return result
    finally:
        shutdown_distributed()


def _train(config: TrainConfig, resume: str | None, info: DistInfo) -> TrainResult:
    from polycom.data import TokenShards, WindowLoader, unigram_entropy

    started = time.perf_counter()
    out_dir = resolve_out_dir(config, resume)
    config.run.out = str(out_dir)
    data_dir = prepare_run_data(config, info)
    data_seconds = time.perf_counter() - started
    train_shards = TokenShards(data_dir, "train")
    resolve_model_and_seq_len(config, train_shards.vocab_size)
    micro = per_rank_micro_batch(config, info.world_size)
    steps = total_steps(config)
    loader = WindowLoader(
        train_shards,
        config.data.seq_len,
        micro * config.data.grad_accum,
        config.run.seed,
        info.rank,
        info.world_size,
    )
    val_windows = validation_windows(data_dir, config, info, micro)
    baseline = unigram_entropy(data_dir) if info.is_main else None

    model, forward = build_model(config, info)
    optimizer = build_optimizer(model, config.optim)
    schedule = LRSchedule.from_config(config.optim.lr, config.schedule, steps)
    spikes = SpikeDetector(config.run.spike_factor)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    state = _resume(resume, out_dir, config, model, optimizer, info)
    start = 0
    if state is not None:
        start = state["step"]
        loader.load_state_dict(state["loader"])
        spikes.load_state_dict(state["spikes"])
        if not state["rng_restored"]:
            ckpt.seed_everything(config.run.seed + 1_000_003 * start + info.rank)
    if info.is_main:
        truncate_metrics(out_dir / "metrics.jsonl", start)
        config.save_json(out_dir / "config.json")
    metrics = MetricsWriter(
        out_dir / "metrics.jsonl", info.is_main, out_dir / "tensorboard" if config.run.tensorboard else None
    )
    flops_per_token = model.flops_per_token(config.data.seq_len)
    peak, peak_note = peak_flops(info.device, config.run.peak_flops)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    if info.is_main:
        _say(info, _header(config, model, info, data_dir, steps, start, baseline, peak_note))
        _say(info, f"data ready in {data_seconds:.1f}s; setup done in {time.perf_counter() - started:.1f}s")

    progress = Progress(steps, start, config.run.log_every, config.run.progress and info.is_main)
    last_row: dict[str, Any] = {}
    last_val: float | None = None
    for step in range(start, steps):
        t0 = time.perf_counter()
        lr = schedule(step)
        set_lr(optimizer, lr)
        inputs, targets = loader.batch(step)
        batches = list(
            zip(inputs.chunk(config.data.grad_accum), targets.chunk(config.data.grad_accum), strict=True)
        )
        row = forward_backward(forward, batches, config, info)
        grad_norm = clip_gradients(model, config.optim.grad_clip)
        verdict = _judge(row["loss"], grad_norm, spikes, config)
        if verdict in ("ok", "spike-warn"):
            optimizer.step()
            spikes.accept(row["loss"])
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        done = step + 1
        row.update(
            step=done,
            tokens=done * tokens_per_step,
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=tokens_per_step / seconds,
            mfu=flops_per_token * tokens_per_step / seconds / (peak * info.world_size),
        )
        if verdict != "ok":
            row["anomaly"] = verdict
            progress.message(
                f"step {done}: {verdict} (loss {row['loss']:.4g}, grad norm {grad_norm:.4g}, "
                f"running mean {spikes.running_mean():.4g})"
            )
        if verdict.endswith("stop"):
            metrics.write(row)
            metrics.close()
            raise TrainingStopped(
                f"stopped at step {done}: {verdict} (loss {row['loss']}, grad norm {grad_norm})"
            )
        if (config.run.eval_every and done % config.run.eval_every == 0) or done == steps:
            last_val = row["val_loss"] = evaluate(forward, val_windows, config, info)
            progress.message(f"step {done}: val loss {last_val:.4f}")
        metrics.write(row)
        last_row = row
        progress.update(done, f"loss {row['loss']:.4f} lr {lr:.2e} {row['tokens_per_s']:.0f} tok/s")
        if (config.run.checkpoint_every and done % config.run.checkpoint_every == 0) or done == steps:
            trainer_state = {
                "step": done,
                "tokens": done * tokens_per_step,
                "loader": loader.state_dict(),
                "schedule": schedule.state_dict(),
                "spikes": spikes.state_dict(),
                "config": config.to_dict(),
                "data_dir": str(data_dir),
                "data_fingerprint": train_shards.fingerprint,
            }
            ckpt.save_checkpoint(out_dir, done, model, optimizer, trainer_state, info, config.run.keep_last)
    metrics.close()
    if last_val is None:  # resumed at (or past) the end: nothing ran, still report the model
        last_val = evaluate(forward, val_windows, config, info)
    ckpt.export_safetensors(
        model, out_dir / "model.safetensors", info, {"config": json.dumps(config.model.to_dict())}
    )
    result = TrainResult(
        out_dir, steps, last_row.get("loss"), last_val, baseline, time.perf_counter() - started
    )
    if info.is_main:
        _write_summary(out_dir, result, train_shards.fingerprint)
        _say(info, _footer(result))
    return result


def _judge(loss: float, grad_norm: float, spikes: SpikeDetector, config: TrainConfig) -> str:
    """``ok``, or what went wrong and what to do: ``nonfinite-skip|stop``, ``spike-warn|skip|stop``."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return f"nonfinite-{config.run.on_nonfinite}"
    if spikes.is_spike(loss):
        return f"spike-{config.run.on_spike}"
    return "ok"


def _header(config, model, info, data_dir, steps, start, baseline, peak_note) -> str:
    n = model.num_params()
    active = model.num_params(active=True)
    params = f"{n / 1e6:.2f}M params" + (f" ({active / 1e6:.2f}M active)" if active != n else "")
    lines = [
        f"train: {config.preset} / {config.model.activation}: {params}, {info.world_size} process(es) "
        f"[{info.parallel}] on {info.device.type}",
        f"data: {data_dir} (vocab {config.model.vocab_size}, seq {config.data.seq_len}, global batch "
        f"{config.data.batch_size} x accum {config.data.grad_accum})",
        f"steps: {start} -> {steps}; unigram baseline val loss {baseline:.4f}; MFU peak: {peak_note}",
        f"out: {config.run.out}",
    ]
    return "\n".join(lines)


def _footer(result: TrainResult) -> str:
    if result.val_loss is None:
        return f"done: {result.steps} steps in {result.seconds:.1f}s -> {result.out_dir}"
    return (
        f"done: {result.steps} steps in {result.seconds:.1f}s; val loss {result.val_loss:.4f} nats/token vs "
        f"unigram baseline {result.unigram_baseline:.4f} ({result.val_loss - result.unigram_baseline:+.4f}); "
        f"run in {result.out_dir}"
    )


def _write_summary(out_dir: Path, result: TrainResult, fingerprint: str) -> None:
    summary = {
        "steps": result.steps,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "unigram_baseline": result.unigram_baseline,
        "seconds": result.seconds,
        "data_fingerprint": fingerprint,
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
