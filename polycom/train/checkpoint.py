"""Atomic, world-size independent checkpoints (torch.distributed.checkpoint), and the safetensors export.

One format for every run, one process or many: a checkpoint is a folder
``<out>/checkpoints/step_00000120/`` holding

- ``state/``        model + optimiser state in DCP format (each rank writes its shards; DCP reshards on
  load, so a run saved by 2 FSDP ranks resumes on 1 process or on 4),
- ``rng/rank_N.pt`` RNG states of each rank (torch CPU, CUDA, python, numpy),
- ``trainer.json``  step, tokens, data position, schedule, spike-detector state, resolved config,
- ``COMPLETE``      written last.

Writing goes to ``.tmp-step_00000120`` in the same parent; every file is fsynced, ``COMPLETE`` is
written, and only then is the folder renamed to its final name (and the parent fsynced). A reader
only accepts ``step_*`` folders that contain ``COMPLETE``, so a process killed mid-write leaves
nothing that ``--resume`` would pick up; stale ``.tmp-*`` folders are removed by the next save.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from polycom.fileio import atomic_write_bytes, atomic_write_text, fsync_path
from polycom.train.distributed import DistInfo, barrier

COMPLETE = "COMPLETE"
FORMAT = "polycom-dcp-v1"
STEP_DIR = re.compile(r"^step_(\d{8})$")
PAUSE_ENV = "POLYCOM_TEST_CHECKPOINT_PAUSE"
"""Test hook ``SECONDS[@STEP]``: sleep after the state is written and before ``COMPLETE`` (kill tests)."""


# ---------------------------------------------------------------------------------------------
# Small atomic-file helpers
# ---------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints under ``folder`` (a run's ``checkpoints/``), oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_checkpoint(spec: str, out_dir: Path) -> Path | None:
    """Resolve ``--resume``: ``auto`` -> latest complete checkpoint of ``out_dir`` or ``None``;
    a path -> that checkpoint, or the latest complete one in that run / checkpoints folder."""
    if spec in ("auto", "latest"):
        found = complete_checkpoints(out_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"--resume {spec}: no such path (give a checkpoint folder, a run folder, or 'auto')")
    if STEP_DIR.match(path.name) or path.name.startswith(".tmp-"):
        if not (path / COMPLETE).is_file():
            raise ValueError(
                f"--resume {spec}: checkpoint is incomplete (no {COMPLETE} file); not loading it"
            )
        return path
    for folder in (path / "checkpoints", path):
        found = complete_checkpoints(folder)
        if found:
            return found[-1]
    raise ValueError(f"--resume {spec}: no complete checkpoint (step_*/{COMPLETE}) found there")


# ---------------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def _remove_stale(folder: Path, keep_last: int) -> None:
    """Drop ``.tmp-*`` leftovers of killed writes and all but the newest ``keep_last`` checkpoints."""
    for path in folder.iterdir():
        if path.name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)
    for old in complete_checkpoints(folder)[:-keep_last]:
        # Rename first so a crash during rmtree cannot leave a step_* folder with missing files.
        doomed = old.with_name(f".tmp-delete-{old.name}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    info: DistInfo,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically (collective: every rank must call it). Returns its path."""
    folder = out_dir / "checkpoints"
    final = folder / step_dir_name(step)
    tmp = folder / f".tmp-{final.name}"
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    barrier()

    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "state"))
    rng_bytes = _torch_bytes(rng_state())
    atomic_write_bytes(tmp / "rng" / f"rank_{info.rank}.pt", rng_bytes)
    barrier()

    if info.is_main:
        meta = {"format": FORMAT, "step": step, "world_size": info.world_size, "parallel": info.parallel}
        atomic_write_text(tmp / "trainer.json", json.dumps({**trainer_state, **meta}, indent=1) + "\n")
        _fsync_tree(tmp)
        _test_pause(step)
        atomic_write_text(tmp / COMPLETE, json.dumps(meta) + "\n")
        if final.exists():  # re-saving a step (e.g. resumed exactly at the end): replace it whole
            doomed = final.with_name(f".tmp-delete-{final.name}")
            os.replace(final, doomed)
            shutil.rmtree(doomed)
        os.replace(tmp, final)
        fsync_path(folder)
        _remove_stale(folder, keep_last)
    barrier()
    return final


@contextlib.contextmanager
def _single_process_quiet():
    """Silence DCP's warning that it runs without a process group (that is the intended 1-process use)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _torch_bytes(obj: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _test_pause(step: int) -> None:
    """``POLYCOM_TEST_CHECKPOINT_PAUSE=SECONDS[@STEP]``: sleep before the commit (of ``STEP`` only)."""
    spec = os.environ.get(PAUSE_ENV, "")
    if not spec:
        return
    seconds, _, only_step = spec.partition("@")
    if only_step and int(only_step) != step:
        return
    print(f"checkpoint: test pause {seconds}s before committing step {step}", file=sys.stderr, flush=True)
    time.sleep(float(seconds))


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo
) -> dict[str, Any]:
    """Load model + optimiser state in place (any world size) and restore this rank's RNG.

    Returns the ``trainer.json`` dict. RNG states are restored only when the world size matches
    (a rank's stream has no counterpart otherwise); the caller reseeds in that case.
    """
    trainer = json.loads((path / "trainer.json").read_text())
    if trainer.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {trainer.get('format')!r}, expected {FORMAT}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / "rng" / f"rank_{info.rank}.pt"
    trainer["rng_restored"] = trainer["world_size"] == info.world_size and rng_file.is_file()
    if trainer["rng_restored"]:
        set_rng_state(torch.load(rng_file, weights_only=True))
    return trainer


def export_safetensors(model: torch.nn.Module, path: Path, info: DistInfo, metadata: dict[str, str]) -> None:
    """Consolidated (unsharded) model weights as one safetensors file, written by rank 0, atomically.

    Collective under FSDP2 (every rank must call it: the full state dict is gathered).
    Tied tensors are stored once per name (safetensors forbids shared storage).
    """
    from safetensors.torch import save_file

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if info.is_main:
        tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata=metadata)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    if dist.is_initialized():
        dist.barrier()
