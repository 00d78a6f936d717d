"""Run setup: the output folder, the prepared data, the model/sequence-length fit, batch arithmetic.

Each function validates one thing the user chose and fails with a ``ValueError`` naming the value
and what would be valid; the training loop calls them before it allocates anything large.
"""

from __future__ import annotations

import math
from pathlib import Path

from polycom.train import checkpoint as ckpt
from polycom.train.config import TrainConfig
from polycom.train.distributed import DistInfo, broadcast_object


def default_out_dir(config: TrainConfig) -> Path:
    return Path("runs") / f"{config.preset}-{config.model.activation}-s{config.run.seed}"


def resolve_out_dir(config: TrainConfig, resume: str | None) -> Path:
    """``run.out``, else the folder of the checkpoint being resumed, else ``runs/<preset>-<act>-s<seed>``.

    Starting from scratch in a folder that already holds checkpoints is refused: a later
    ``--resume auto`` could otherwise mix the two runs.
    """
    if config.run.out:
        out_dir = Path(config.run.out)
    elif resume not in (None, "auto", "latest"):
        found = ckpt.find_checkpoint(resume, Path("."))
        out_dir = found.parent.parent
    else:
        out_dir = default_out_dir(config)
    existing = ckpt.complete_checkpoints(out_dir / "checkpoints")
    if resume is None and existing:
        raise ValueError(
            f"{out_dir} already holds checkpoints (latest {existing[-1].name}); pass --resume auto to "
            "continue that run, or choose another --out"
        )
    return out_dir


def prepare_run_data(config: TrainConfig, info: DistInfo) -> Path:
    """The prepared shard directory for ``config.data`` (rank 0 prepares; the others wait and reuse)."""
    from polycom.data import prepare_data, read_index

    data = config.data
    source = Path(data.source)
    if (
        data.source not in ("stdlib",)
        and not data.source.startswith("hf:")
        and (source / "index.json").is_file()
    ):
        read_index(source)  # validates the format with a clear error
        return source
    outcome: tuple[str, str] | None = None
    if info.is_main:
        sources = [p.strip() for p in data.source.split(",")] if "," in data.source else data.source
        try:
            path = prepare_data(
                sources,
                tokenizer=data.tokenizer,
                vocab_size=data.vocab_size,
                cache_dir=data.cache_dir,
                text_field=data.text_field,
                max_bytes=data.max_bytes,
                dtype=data.shard_dtype,
            )
            outcome = ("ok", str(path))
        except ValueError as err:  # tell the other ranks, so that every rank stops with the same error
            outcome = ("error", str(err))
    status, value = broadcast_object(outcome)
    if status == "error":
        raise ValueError(value)
    return Path(value)


def resolve_model_and_seq_len(config: TrainConfig, vocab_size: int) -> None:
    """Fit the model's vocabulary to the data's and check the sequence length, in place."""
    from polycom.models import get_preset

    model = config.model
    if model.vocab_size != vocab_size:
        if config.model_vocab_explicit and model.vocab_size < vocab_size:
            raise ValueError(
                f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({vocab_size}); token ids would be out of range; use >= {vocab_size} or leave it unset"
            )
        if not config.model_vocab_explicit:
            config.model = get_preset(config.preset, **{**model.to_dict(), "vocab_size": vocab_size})
    seq_len = config.data.seq_len or config.model.max_seq_len
    if seq_len > config.model.max_seq_len:
        raise ValueError(
            f"data.seq_len={seq_len} is larger than the model's max_seq_len={config.model.max_seq_len}; "
            f"use --data.seq_len <= {config.model.max_seq_len} or raise --model.max_seq_len"
        )
    config.data.seq_len = seq_len


def per_rank_micro_batch(config: TrainConfig, world_size: int) -> int:
    """``batch_size / (world_size * grad_accum)``, which must be a whole number."""
    data = config.data
    parts = world_size * data.grad_accum
    if data.batch_size % parts:
        raise ValueError(
            f"data.batch_size={data.batch_size} is not divisible by world_size x grad_accum = "
            f"{world_size} x {data.grad_accum}; choose a multiple of {parts}"
        )
    return data.batch_size // parts


def total_steps(config: TrainConfig) -> int:
    """``run.max_tokens`` (rounded up to whole steps) when given, else ``run.max_steps``."""
    run = config.run
    if run.max_tokens is not None:
        return max(1, math.ceil(run.max_tokens / (config.data.batch_size * config.data.seq_len)))
    return run.max_steps


def validation_windows(data_dir: Path, config: TrainConfig, info: DistInfo, micro: int):
    """The fixed eval windows: ``eval_batches x batch_size`` of them (fewer on a small split), split
    evenly over ranks so every rank runs the same number of forward passes (FSDP2 needs that)."""
    from polycom.data import TokenShards, ValidationWindows

    val = TokenShards(data_dir, "val")
    available = (val.num_tokens - 1) // config.data.seq_len
    count = min(config.run.eval_batches * config.data.batch_size, available)
    count -= count % info.world_size
    if count < 1:
        raise ValueError(
            f"the validation split of {str(data_dir)!r} has {val.num_tokens} tokens: not one window of "
            f"data.seq_len + 1 = {config.data.seq_len + 1} per rank; use a shorter seq_len or more data"
        )
    return ValidationWindows(val, config.data.seq_len, micro, count, info.rank, info.world_size)
