"""Typed training configs, dotted overrides (``--optim.lr 1e-3``) and the JSON written to every run.

A :class:`TrainConfig` has five sections: ``model`` (a :class:`polycom.models.ModelConfig` built by
``get_preset``), ``optim``, ``schedule``, ``data`` and ``run``. Overrides are ``(dotted key, string)``
pairs; each string is coerced to the field's annotated type (``int``, ``float``, ``bool``,
``str``, ``X | None``, ``tuple[float, float]``, ``dict``). An unknown key raises a ``ValueError``
that names the closest valid keys (``difflib``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = ("model", "optim", "schedule", "data", "run")
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")
DTYPES = ("auto", "float32", "bfloat16")
DECAYS = ("cosine", "linear", "constant")
ON_NONFINITE = ("skip", "stop")
ON_SPIKE = ("warn", "skip", "stop")


def _choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(valid)}")


def _positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not (value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay; ``grad_clip`` is the max global L2 norm (0 disables)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.eps", self.eps)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))


@dataclass
class ScheduleConfig:
    """Linear warmup to ``optim.lr``, then ``decay`` to the floor ``min_lr`` (or ``lr * min_lr_ratio``).

    ``warmup_steps=None`` means 5 % of the run (at least 1 step); ``decay_steps=None`` means the
    decay ends at the last step (set it larger to truncate a longer schedule).
    """

    warmup_steps: int | None = None
    decay: str = "cosine"
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    min_lr: float | None = None

    def __post_init__(self) -> None:
        _choice("schedule.decay", self.decay, DECAYS)
        _positive("schedule.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("schedule.decay_steps", self.decay_steps)
        _positive("schedule.min_lr", self.min_lr, allow_zero=True)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


@dataclass
class DataConfig:
    """Where tokens come from and how many go into one optimiser step.

    ``source``: ``"stdlib"`` (the embedded Python standard library corpus), local ``.txt`` /
    ``.jsonl`` / ``.parquet`` files or folders (comma-separated), ``hf:NAME`` for a Hugging Face
    dataset, or a folder already prepared by ``polycom prepare`` (it has an ``index.json``).
    ``tokenizer``: ``None`` trains a byte-level BPE of ``vocab_size`` on the train split (cached);
    otherwise a ``tokenizer.json`` path or a Hugging Face tokenizer name.
    ``batch_size`` is the global batch in sequences per optimiser step; each rank gets
    ``batch_size / world_size`` of it, split into ``grad_accum`` micro-batches.
    ``seq_len=None`` means the model's ``max_seq_len``. ``max_bytes`` caps the corpus read (a quick
    run on a slice); ``shard_dtype`` forces ``uint16``/``uint32`` shards (``None``: by vocabulary).
    """

    source: str = "stdlib"
    tokenizer: str | None = None
    vocab_size: int = 4096
    seq_len: int | None = 128
    batch_size: int = 16
    grad_accum: int = 1
    text_field: str = "text"
    max_bytes: int | None = None
    shard_dtype: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value!r}")
        if not self.source:
            raise ValueError("data.source is empty; use 'stdlib', a path, or 'hf:NAME'")


@dataclass
class RunConfig:
    """Run length, checkpointing, logging, precision and parallelism.

    The run stops after ``max_steps`` steps or, when ``max_tokens`` is set (it wins), after that many
    tokens rounded up to whole steps. ``checkpoint_every=0`` writes a checkpoint only at the end;
    ``eval_every=0`` evaluates only at the end. ``dtype="auto"`` is bf16 autocast on CUDA and fp32 on CPU.
    ``parallel="auto"`` is ``ddp`` under ``torchrun`` with more than one process, else ``none``.
    A loss above ``spike_factor`` times its running mean is a spike (``on_spike``); a non-finite
    loss or gradient norm triggers ``on_nonfinite``. ``peak_flops`` (per device, FLOP/s) is the
    MFU denominator; ``None`` guesses it from the device (a rough estimate on CPU).
    """

    out: str | None = None
    seed: int = 0
    max_steps: int = 200
    max_tokens: int | None = None
    checkpoint_every: int = 0
    keep_last: int = 2
    eval_every: int = 0
    eval_batches: int = 8
    log_every: int = 10
    compile: bool = False
    dtype: str = "auto"
    parallel: str = "auto"
    on_nonfinite: str = "skip"
    spike_factor: float = 3.0
    on_spike: str = "warn"
    tensorboard: bool = False
    peak_flops: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _choice("run.dtype", self.dtype, DTYPES)
        _choice("run.parallel", self.parallel, PARALLEL_MODES)
        _choice("run.on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        _choice("run.on_spike", self.on_spike, ON_SPIKE)
        _positive("run.max_steps", self.max_steps)
        _positive("run.max_tokens", self.max_tokens)
        _positive("run.peak_flops", self.peak_flops)
        _positive("run.spike_factor", self.spike_factor)
        for name in ("checkpoint_every", "eval_every", "eval_batches", "log_every"):
            _positive(f"run.{name}", getattr(self, name), allow_zero=True)
        if self.keep_last < 1:
            raise ValueError(f"run.keep_last must be >= 1, got {self.keep_last!r}")


@dataclass
class TrainConfig:
    """Everything a run needs; ``preset`` names the model preset the ``model`` section started from."""

    model: Any
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = "tiny"
    # True when --model.vocab_size was given; otherwise the model takes the tokenizer's vocabulary.
    model_vocab_explicit: bool = field(default=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"preset": self.preset, "model": self.model.to_dict()}
        for name in SECTIONS[1:]:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        from polycom.models import ModelConfig

        sections = {"optim": OptimConfig, "schedule": ScheduleConfig, "data": DataConfig, "run": RunConfig}
        kwargs = {name: kind(**_known(kind, data.get(name, {}), name)) for name, kind in sections.items()}
        return cls(model=ModelConfig.from_dict(data["model"]), preset=data.get("preset", "tiny"), **kwargs)

    def save_json(self, path: Path) -> None:
        """Write the resolved config as JSON, atomically (temp file, then rename)."""
        from polycom.fileio import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _known(kind: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown key {section}.{unknown[0]}; valid: {', '.join(sorted(names))}")
    return values


# ---------------------------------------------------------------------------------------------
# Dotted overrides
# ---------------------------------------------------------------------------------------------


def field_types(kind: type) -> dict[str, Any]:
    """``{field name: resolved annotation}`` of a dataclass (string annotations resolved)."""
    hints = typing.get_type_hints(kind)
    return {f.name: hints[f.name] for f in dataclasses.fields(kind)}


def coerce(key: str, text: str, annotation: Any) -> Any:
    """Convert the command-line string ``text`` to ``annotation`` (``int | None``, ``bool``, ...)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(key, text, option)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{key}: cannot parse {text!r}")
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key} expects true/false, got {text!r}")
    if annotation is int:
        return _parse_int(key, text)
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{key} expects a number, got {text!r}") from None
    if annotation is str:
        return text
    if origin is tuple:
        parts = json.loads(text) if text.startswith("[") else text.split(",")
        if len(args) == 2 and args[1] is not Ellipsis and len(parts) != len(args):
            raise ValueError(f"{key} expects {len(args)} comma-separated values, got {text!r}")
        inner = args if args[-1] is not Ellipsis else (args[0],) * len(parts)
        return tuple(coerce(key, str(p).strip(), t) for p, t in zip(parts, inner, strict=True))
    if origin is dict or annotation is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{key} expects a JSON object like '{{\"k\": 1}}', got {text!r}") from None
        if not isinstance(value, dict):
            raise ValueError(f"{key} expects a JSON object, got {text!r}")
        return value
    raise ValueError(f"{key} cannot be set from the command line (type {annotation})")


def _parse_int(key: str, text: str) -> int:
    """Integers, also written as ``1e6`` or ``1_000_000`` (handy for token budgets)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{key} expects an integer, got {text!r}") from None
    if not value.is_integer():
        raise ValueError(f"{key} expects an integer, got {text!r}")
    return int(value)


def valid_keys() -> list[str]:
    """Every dotted key an override may name (``model.*``, ``model.moe.*``, ``optim.*``, ...)."""
    from polycom.models import ModelConfig, MoEConfig

    keys = [f"model.{name}" for name in field_types(ModelConfig)]
    keys += [f"model.moe.{name}" for name in field_types(MoEConfig)]
    for section, kind in (("optim", OptimConfig), ("schedule", ScheduleConfig), ("data", DataConfig)):
        keys += [f"{section}.{name}" for name in field_types(kind)]
    keys += [f"run.{name}" for name in field_types(RunConfig)]
    return keys


def unknown_key_error(key: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if not close:  # try the last component alone: "--optim.learning_rate" -> "optim.lr" is too far
        tail = key.rsplit(".", 1)[-1]
        close = [k for k in valid if difflib.get_close_matches(tail, [k.rsplit(".", 1)[-1]], cutoff=0.75)]
    hint = f"; did you mean {' or '.join('--' + c for c in close[:3])}?" if close else ""
    section = key.split(".", 1)[0]
    if section not in SECTIONS:
        hint += f" (sections: {', '.join(SECTIONS)})"
    return ValueError(f"unknown config key --{key}{hint}")


def build_config(preset: str, overrides: list[tuple[str, str]]) -> TrainConfig:
    """Resolve ``preset`` plus dotted ``overrides`` into a validated :class:`TrainConfig`.

    Model keys go through ``get_preset(preset, **model_overrides)`` so the models' own validation
    runs; ``model.moe.*`` keys replace fields of the preset's :class:`MoEConfig`.
    """
    from polycom.models import ModelConfig, MoEConfig, get_preset

    valid = valid_keys()
    grouped: dict[str, dict[str, Any]] = {name: {} for name in (*SECTIONS, "model.moe")}
    types_of = {
        "model": field_types(ModelConfig),
        "model.moe": field_types(MoEConfig),
        "optim": field_types(OptimConfig),
        "schedule": field_types(ScheduleConfig),
        "data": field_types(DataConfig),
        "run": field_types(RunConfig),
    }
    for key, text in overrides:
        if key not in valid:
            raise unknown_key_error(key, valid)
        section, name = key.rsplit(".", 1)
        grouped[section][name] = coerce("--" + key, text, types_of[section][name])

    model_overrides = grouped["model"]
    if grouped["model.moe"]:
        base = model_overrides.get("moe") or get_preset(preset).moe
        if base is None:
            raise ValueError(
                f"--model.moe.* given but preset {preset!r} is dense; use an MoE preset "
                "(e.g. --preset moe-tiny)"
            )
        model_overrides["moe"] = dataclasses.replace(base, **grouped["model.moe"])
    model = get_preset(preset, **model_overrides)
    return TrainConfig(
        model=model,
        preset=preset,
        model_vocab_explicit="vocab_size" in model_overrides,
        optim=OptimConfig(**grouped["optim"]),
        schedule=ScheduleConfig(**grouped["schedule"]),
        data=DataConfig(**grouped["data"]),
        run=RunConfig(**grouped["run"]),
    )


def describe_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (for resume checks)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += describe_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, (list, tuple)) and list(a) == list(b or [])):
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs
