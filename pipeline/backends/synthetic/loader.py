"""A loader with no data: random normalised views made on the device, for benchmarks that should time only the model.

A small pool of batches is generated once, on `ctx.device`, and cycled through: the loop then costs nothing per step
(no RNG, no copy), so samples/sec measures the model. The pixels are uniform on [0, 1] before normalisation, so the
values span the range real normalised images have.
"""
from __future__ import annotations

from typing import Iterator

import torch

from byolfast.pipeline.config import DataConfig
from byolfast.pipeline.contract import Batch, LoaderContext, TwoViewLoader, to_contract
from byolfast.pipeline.sharding import rank_seed


class SyntheticTwoViewLoader(TwoViewLoader):
    """`cfg.synthetic_size` samples per epoch of random views, labels -1, index the sample ids.

    Args:
        cfg: the data config (`synthetic_size`, `image_size`, `augment.mean` / `augment.std`).
        ctx: the run's loader context.
        pool_batches: distinct batches generated and cycled through.
    """

    def __init__(self, cfg: DataConfig, ctx: LoaderContext, pool_batches: int = 2):
        super().__init__(ctx)
        self.cfg = cfg
        self.require_one_global_batch(f"data.synthetic_size={cfg.synthetic_size}", "raise it or lower the batch size")
        self.pool_batches = max(1, min(pool_batches, len(self)))
        self._pool: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._labels = torch.full((ctx.batch_size,), -1, dtype=torch.int64, device=ctx.device)

    @property
    def num_samples(self) -> int:
        return self.cfg.synthetic_size

    def _make_pool(self) -> None:
        ctx, size = self.ctx, self.cfg.image_size
        gen = torch.Generator(device=ctx.device).manual_seed(rank_seed(ctx.seed, ctx.rank))
        mean = torch.tensor(self.cfg.augment.mean, dtype=torch.float32, device=ctx.device)
        std = torch.tensor(self.cfg.augment.std, dtype=torch.float32, device=ctx.device)

        def view() -> torch.Tensor:
            # NHWC draws viewed as NCHW are channels_last already; to_contract keeps or changes that per ctx.
            u = torch.rand((ctx.batch_size, size, size, 3), generator=gen, device=ctx.device)
            return to_contract(u.sub_(mean).div_(std).permute(0, 3, 1, 2), ctx)

        self._pool = [(view(), view()) for _ in range(self.pool_batches)]

    def _iter_epoch(self) -> Iterator[Batch]:
        return self._batches(self.start_batch)  # read start_batch now: the base class resets it on return

    def _batches(self, start_batch: int) -> Iterator[Batch]:
        if not self._pool:
            self._make_pool()
        ctx = self.ctx
        offsets = torch.arange(ctx.batch_size, dtype=torch.int64) * ctx.world_size
        for b in range(start_batch, len(self)):
            view1, view2 = self._pool[b % self.pool_batches]
            # Sample ids dealt round-robin over ranks, as `rank_indices` does without shuffling.
            yield Batch(view1, view2, self._labels, offsets + (b * ctx.batch_size * ctx.world_size + ctx.rank))

    def close(self) -> None:
        self._pool = []
