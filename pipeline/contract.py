"""The batch contract every loader backend keeps, and the context the trainer hands to a backend.

A backend is built by `build_two_view_loader(cfg, ctx)` and is an iterable of `Batch`:
  - `view1`, `view2`: float tensors (N, 3, S, S) on `ctx.device`, `channels_last` memory format when
    `ctx.channels_last`, normalised with the spec's mean/std, dtype `ctx.dtype`;
  - `labels`: int64 (N,) on `ctx.device` (-1 where the source has no label, e.g. `synthetic`);
  - `index`: int64 (N,) dataset indices of the samples, on any device, or None where a backend cannot tell.
Every batch has exactly `ctx.batch_size` samples (drop_last). The loader shards by `ctx.rank` / `ctx.world_size`,
reshuffles per epoch from `ctx.seed` (the same on every rank, so shards are disjoint), and draws its augmentation
randomness per sample, from generators seeded with `rank_seed(ctx.seed, ctx.rank)` or, better, from (seed, epoch,
global index), which makes the views independent of the world size.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional

import torch

from byolfast.pipeline.sharding import num_batches


class Batch(NamedTuple):
    view1: torch.Tensor
    view2: torch.Tensor
    labels: torch.Tensor
    index: Optional[torch.Tensor] = None


@dataclass
class LoaderContext:
    """What a backend needs to know about the run, resolved once by the trainer.

    Args:
        device: the training device; batches are delivered there.
        dtype: dtype of the views (the training precision: bfloat16, float16 or float32).
        batch_size: samples per batch on this rank.
        rank, world_size: this process's place in the job.
        seed: the run's base seed (shared by all ranks; augmentation mixes in the rank: `sharding.rank_seed`).
        channels_last: deliver views in `channels_last` memory format.
        drop_last: drop the last incomplete batch (always True for training).
        shuffle: reshuffle per epoch (False gives the dataset order, for evaluation).
        worker_ignored_signals: signal names the backend's worker processes ignore: the trainer's preemption
            signals, which it handles itself. A signal sent to the whole process group (`timeout`, a scheduler's
            cancel) would otherwise kill a worker, and the training step with it, before the checkpoint.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    batch_size: int = 32
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    channels_last: bool = True
    drop_last: bool = True
    shuffle: bool = True
    worker_ignored_signals: tuple[str, ...] = ()


class DataError(RuntimeError):
    """A user-fixable problem with the data (missing path, empty class, truncated file); the message says what to do."""


class TwoViewLoader(abc.ABC):
    """Base of every backend. Subclasses implement `num_samples`, `_iter_epoch` and, where they can, `stats`; the base
    owns the bookkeeping: the epoch and resume position, the length in whole global batches, the empty-epoch check."""

    def __init__(self, ctx: LoaderContext):
        self.ctx = ctx
        self.epoch = 0
        self.start_batch = 0

    @property
    @abc.abstractmethod
    def num_samples(self) -> int:
        """Samples in the whole dataset (all ranks)."""

    def __len__(self) -> int:
        """Batches per epoch on this rank: the whole global batches `num_samples` fills (the rest is dropped)."""
        return num_batches(self.num_samples, self.ctx.batch_size, self.ctx.world_size)

    def require_one_global_batch(self, what: str, fix: str = "lower the batch size or add images") -> None:
        """Raise `DataError` naming `what` (the data's path or setting) when it fills no global batch: every epoch
        would be empty."""
        if len(self) == 0:
            raise DataError(f"{what} holds {self.num_samples} images, fewer than one global batch "
                            f"({self.ctx.batch_size} x {self.ctx.world_size} ranks): {fix}")

    #: Epochs from this one on will not be asked for (the trainer sets it from its schedule; None: unknown). A backend
    #: that prepares the next epoch ahead does not prepare one beyond the run.
    stop_epoch: Optional[int] = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's shuffle and skip its first `start_batch` batches (mid-epoch resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    @abc.abstractmethod
    def _iter_epoch(self) -> Iterator[Batch]:
        """Yield the batches of `self.epoch`, starting at `self.start_batch`."""

    def __iter__(self) -> Iterator[Batch]:
        it = self._iter_epoch()
        self.start_batch = 0
        return it

    @property
    def read_ahead(self) -> int:
        """Batches the backend may hold ready ahead of its consumer (its prefetch queues): a benchmark must consume
        that many before its clock starts, or it times batches prepared while nobody was counting."""
        return 0

    def stats(self) -> dict:
        """Counters worth logging, e.g. {"bad_images": 3}."""
        return {}

    def close(self) -> None:
        """Release worker processes / pipelines."""


def skipped_images(stats: dict) -> tuple[int, str]:
    """How many images a run leaves out, from its loader's `stats()`, and one line saying how many, why, where to look.

    Two counts add up: `bad_images` (with `bad_paths`), files found unreadable by the loader itself (the torch
    backend replaces them by other samples, DALI's folder check leaves them out), and `convert_skipped` (with
    `convert_skip_reasons` and `convert_report`), images `byol convert` left out of the beton or shards.

    Returns:
        (the count, the line; "" when nothing was skipped).
    """
    parts = []
    at_load, at_convert = int(stats.get("bad_images", 0)), int(stats.get("convert_skipped", 0))
    if at_convert:
        reasons = ", ".join(f"{n} {r}" for r, n in stats.get("convert_skip_reasons", {}).items())
        parts.append(f"{at_convert} images were skipped at convert time ({reasons}; see "
                     f"{stats.get('convert_report', 'convert_report.json')})")
    if at_load:
        paths = list(stats.get("bad_paths", []))
        listing = ", ".join(paths[:5]) + (" ..." if len(paths) > 5 else "")
        why = ", ".join(f"{n} {r}" for r, n in stats.get("bad_reasons", {}).items())
        parts.append(f"{at_load} unreadable image files were not trained on ({listing}; "
                     + (f"{why})" if why else "the warnings above say why)"))
    return at_load + at_convert, "; ".join(parts)


def to_contract(x: torch.Tensor, ctx: LoaderContext) -> torch.Tensor:
    """Move a float NCHW batch to the device, dtype and memory format of the contract."""
    x = x.to(ctx.device, non_blocking=True)
    fmt = torch.channels_last if ctx.channels_last else torch.contiguous_format
    return x.to(dtype=ctx.dtype, memory_format=fmt)


def check_batch(batch: Batch, ctx: LoaderContext, image_size: int) -> None:
    """Raise AssertionError unless `batch` keeps the contract (used by the contract test of every backend)."""
    for name in ("view1", "view2"):
        v = getattr(batch, name)
        assert v.shape == (ctx.batch_size, 3, image_size, image_size), f"{name}: shape {tuple(v.shape)}"
        assert v.dtype == ctx.dtype, f"{name}: dtype {v.dtype} != {ctx.dtype}"
        assert v.device.type == ctx.device.type, f"{name}: device {v.device} != {ctx.device}"
        if ctx.channels_last:
            assert v.is_contiguous(memory_format=torch.channels_last), f"{name}: not channels_last"
    assert batch.labels.shape == (ctx.batch_size,) and batch.labels.dtype == torch.int64, "labels"
    assert batch.labels.device.type == ctx.device.type, "labels device"
    if batch.index is not None:
        assert batch.index.shape == (ctx.batch_size,), "index"
