"""Run metrics: ``metrics.jsonl`` (+ optional TensorBoard), a dependency-free progress line with ETA,
loss-spike detection, and the MFU estimate.

MFU (model FLOPs utilisation) = ``flops_per_token * tokens_per_second / (peak_flops * world_size)``,
with ``flops_per_token`` from ``model.flops_per_token()`` (about ``6 N_active`` plus attention).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

import torch

from polycom.fileio import atomic_write_text

# Dense bf16 tensor-core peaks (FLOP/s) of common accelerators, matched by substring of the name.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "V100": 125e12,
    "T4": 65e12,
}
CPU_HZ = 2.5e9  # a typical sustained clock; the CPU peak below is an estimate, not a measurement


def cpu_flops_per_cycle() -> int:
    """fp32 FLOP/cycle/core: 2 FMA units x 16 lanes x 2 with AVX-512, x 8 lanes with AVX2 (Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 32
    return 64 if " avx512f" in flags else 32


def peak_flops(device: torch.device, configured: float | None) -> tuple[float, str]:
    """``(peak FLOP/s per device, how it was obtained)``; the user's value wins."""
    if configured:
        return configured, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value, f"{name} bf16 dense peak"
        return 100e12, f"unknown GPU {name}: assumed 100 TFLOP/s"
    threads, per_cycle = torch.get_num_threads(), cpu_flops_per_cycle()
    note = f"CPU estimate ({threads} threads x {per_cycle} FLOP/cycle x 2.5 GHz)"
    return threads * per_cycle * CPU_HZ, note


class MetricsWriter:
    """Appends one JSON object per row to ``metrics.jsonl`` (rank 0 only), optionally to TensorBoard."""

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.enabled = enabled
        self._file: TextIO | None = open(path, "a") if enabled else None  # noqa: SIM115 (long-lived)
        self._tb = None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(
                    "tensorboard is not installed (pip install tensorboard); logging to metrics.jsonl only",
                    file=sys.stderr,
                )
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: _finite_or_none(v) for k, v in row.items()}  # strict JSON: NaN / inf become null
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only rows with ``step <= last_step``: on resume, the killed run may have logged further
    (and its last line may be cut short by the kill)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["step"] <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A one-line progress bar with ETA on stderr (redrawn in place on a terminal, else one line
    every ``every`` steps)."""

    def __init__(self, total: int, start: int, every: int, enabled: bool, stream: TextIO = sys.stderr):
        self.total, self.start, self.every = total, start, max(1, every)
        self.enabled = enabled
        self.stream = stream
        self.tty = stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, text: str) -> None:
        """Show progress after ``step`` (1-based count of finished steps)."""
        if not self.enabled or not (self.tty or step % self.every == 0 or step == self.total):
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        width = 20
        filled = int(width * step / max(1, self.total))
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {step}/{self.total} {text} | {format_duration(elapsed)} < {format_duration(eta)}"
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line that interrupts the bar (warnings, eval results)."""
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()


class SpikeDetector:
    """Flags a loss above ``factor`` times the mean of the last ``window`` accepted losses.

    Needs ``min_history`` accepted losses before it flags anything (early losses fall fast).
    Its state is saved in checkpoints so that skip decisions replay identically after a resume.
    """

    def __init__(self, factor: float, window: int = 50, min_history: int = 10) -> None:
        self.factor = factor
        self.min_history = min_history
        self.history: deque[float] = deque(maxlen=window)

    def running_mean(self) -> float:
        return sum(self.history) / len(self.history) if self.history else math.nan

    def is_spike(self, loss: float) -> bool:
        return len(self.history) >= self.min_history and loss > self.factor * self.running_mean()

    def accept(self, loss: float) -> None:
        if math.isfinite(loss):
            self.history.append(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.clear()
        self.history.extend(state["history"])
