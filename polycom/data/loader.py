"""Fixed-length windows of token shards for training and evaluation.

Training (:class:`WindowLoader`): stateless random windows. For step ``s`` the *global* batch is
``global_batch = batch_size * world_size`` window starts drawn uniformly with replacement,

    starts = randint(0, N - seq_len - 1 + 1, (global_batch,), generator = Generator(seed_of(seed, s)))

(``N`` = tokens in the split), and rank ``r`` takes ``starts[r * batch_size : (r + 1) * batch_size]``.
So the batch depends only on (seed, step, rank, world_size), the global batch is the rank-ordered
concatenation of the per-rank batches (1 rank with batch ``B * W`` sees exactly what ``W`` ranks
with batch ``B`` see), and resuming needs nothing but the step number. Each window has
``seq_len + 1`` tokens: ``inputs = w[:-1]``, ``targets = w[1:]``.

Why random starts rather than an epoch permutation: no state, any world size, and a corpus of a few
million tokens is revisited at every offset rather than at ``seq_len``-aligned ones. The price is
sampling with replacement (some windows repeat within an epoch's worth of steps).

Evaluation (:class:`ValidationWindows`): fixed, non-overlapping windows evenly spread over the split
-- the same windows at every eval, in the same order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch

from polycom.data.shards import TokenShards


def step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step): neighbouring steps get unrelated streams."""
    digest = hashlib.sha256(f"polycom-loader:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _windows_to_tensors(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``windows [B, T + 1]`` -> ``(inputs [B, T], targets [B, T])`` as int64 tensors."""
    tokens = torch.from_numpy(windows.astype(np.int64))
    return tokens[:, :-1], tokens[:, 1:]


class WindowLoader:
    """Rank-aware random windows: ``batch(step) -> (inputs LongTensor[B, T], targets LongTensor[B, T])``.

    ``B = batch_size`` (per rank), ``T = seq_len``. See the module docstring for the sampling rule.
    """

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_positive(seq_len=seq_len, batch_size=batch_size, world_size=world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if shards.num_tokens < seq_len + 1:
            raise ValueError(
                f"seq_len {seq_len} needs windows of {seq_len + 1} tokens but the {shards.split} split of "
                f"{str(shards.data_dir)!r} has only {shards.num_tokens}; use a shorter seq_len or more data"
            )
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size
        self.seed, self.rank, self.world_size = int(seed), rank, world_size

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def global_starts(self, step: int) -> torch.Tensor:
        """Window starts of the whole global batch of ``step``: LongTensor[batch_size * world_size]."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step!r}")
        generator = torch.Generator().manual_seed(step_seed(self.seed, step))
        high = self.shards.num_tokens - (self.seq_len + 1) + 1
        return torch.randint(0, high, (self.global_batch_size,), generator=generator, dtype=torch.int64)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(inputs, targets)`` for ``step``, each LongTensor[batch_size, seq_len]."""
        starts = self.global_starts(step)[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = np.stack([self.shards.read(int(s), self.seq_len + 1) for s in starts])
        return _windows_to_tensors(windows)

    def tokens_per_step(self) -> int:
        """Tokens in one global batch (all ranks): the unit of the training token budget."""
        return self.global_batch_size * self.seq_len

    def state_dict(self) -> dict:
        """What a checkpoint needs to reproduce the batches: the seed (the step is the trainer's)."""
        return {"seed": self.seed, "seq_len": self.seq_len, "num_tokens": self.shards.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Restore the seed; refuse a checkpoint made on different data or a different seq_len."""
        for key in ("seq_len", "num_tokens"):
            mine = getattr(self, key) if key == "seq_len" else self.shards.num_tokens
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, but this loader has {key}={mine}")
        self.seed = int(state["seed"])


class ValidationWindows:
    """The same evaluation windows every time: iterate for ``(inputs, targets)`` batches.

    The split holds ``M = (N - 1) // seq_len`` non-overlapping windows (window ``i`` covers tokens
    ``[i * seq_len, (i + 1) * seq_len + 1)``); ``max_windows = K < M`` keeps windows
    ``floor(j * M / K)`` for ``j < K``, spread over the whole split. With ``world_size > 1`` rank
    ``r`` takes the contiguous slice ``[r * K // W, (r + 1) * K // W)`` of them (sizes differ by at
    most one); the caller sums losses and token counts over ranks before dividing.
    """

    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        batch_size: int,
        max_windows: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_positive(seq_len=seq_len, batch_size=batch_size, world_size=world_size)
        if max_windows is not None:
            _check_positive(max_windows=max_windows)
        total = (shards.num_tokens - 1) // seq_len
        if total < 1:
            raise ValueError(
                f"the {shards.split} split of {str(shards.data_dir)!r} has {shards.num_tokens} tokens, fewer "
                f"than one window of seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data"
            )
        count = total if max_windows is None else min(max_windows, total)
        chosen = [j * total // count for j in range(count)]
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        self.window_ids = chosen[rank * count // world_size : (rank + 1) * count // world_size]
        self.shards, self.seq_len, self.batch_size = shards, seq_len, batch_size

    @property
    def num_windows(self) -> int:
        return len(self.window_ids)

    def __len__(self) -> int:
        """Number of batches."""
        return -(-self.num_windows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, self.num_windows, self.batch_size):
            ids = self.window_ids[first : first + self.batch_size]
            windows = np.stack([self.shards.read(i * self.seq_len, self.seq_len + 1) for i in ids])
            yield _windows_to_tensors(windows)


def unigram_entropy(
    train: TokenShards | str, val: TokenShards | None = None, chunk_tokens: int = 1 << 24
) -> float:
    """Cross-entropy (nats/token) of the val tokens under the train split's unigram distribution.

    ``H = -sum_v q_val(v) * log p_train(v)`` with add-one smoothing
    ``p_train(v) = (count_train(v) + 1) / (N_train + V)`` so ids unseen in train stay finite. A
    model that learnt nothing beyond token frequencies reaches about this val loss.
    ``train`` may be a prepared directory (then both splits are opened from it).
    """
    if not isinstance(train, TokenShards):
        train, val = TokenShards(train, "train"), TokenShards(train, "val")
    if val is None:
        val = TokenShards(train.data_dir, "val")
    vocab = max(train.vocab_size, val.vocab_size)

    def counts(shards: TokenShards) -> np.ndarray:
        total = np.zeros(vocab, dtype=np.int64)
        for start in range(0, shards.num_tokens, chunk_tokens):
            part = shards.read(start, min(chunk_tokens, shards.num_tokens - start))
            total += np.bincount(part, minlength=vocab)[:vocab]
        return total

    train_counts, val_counts = counts(train), counts(val)
    log_p = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab)
    return float(-(val_counts * log_p).sum() / val_counts.sum())
