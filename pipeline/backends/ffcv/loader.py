"""The FFCV backend: a `.beton` file, FFCV's fused decode + random resized crop on CPU threads, colour on the device.

Read top to bottom:
    decode once + both views' RandomResizedCrop + flip (CPU, numba threads)  ->  per view: `ViewOf`  ->  ToTensor
    ->  ToDevice  ->  ToTorchImage  ->  `BatchedViewAugment` (jitter in a random order per sample, grayscale, blur,
    solarize, normalise; device)  ->  `to_contract` (dtype, memory format).
The second view's pipeline (`image2`) starts from the one decoder's result (a `PipelineSpec` whose source is it).

Where this departs from stock FFCV 1.0.2, and why:
  - Seeding. FFCV's `Loader(seed=...)` seeds only the sample order. Its crop (`get_random_crop`) and flip
    (`RandomHorizontalFlip`) draw from numba's `np.random`, whose per-thread state numba seeds from OS entropy, so
    stock FFCV crops differ from run to run and a resumed run cannot replay them. Here one decoder does the crop and
    the flip, and re-seeds numba's generator per sample from `(seed, rank, epoch, view, index)` right before its
    draws: the crops are reproducible, independent of the thread count and of the resume point, and new each epoch.
    The epoch enters through a small per-epoch buffer of the decoder (compiled code cannot see a Python attribute
    change without a 13-31 s recompilation). The device augmentation re-seeds its generator per batch from
    `(seed, rank, epoch, batch)`, so `set_epoch(e, start_batch)` replays exactly the batches of an uninterrupted run.
  - Sharding. FFCV's `distributed=True` builds a `DistributedSampler` (it needs an initialised process group at
    construction, pads the epoch by repeating samples, and ignores the other backends' permutation) and is refused
    for quasi-random order. Instead every epoch's order comes from `pipeline.sharding.rank_indices` (the permutation
    all backends share, dealt round-robin to the ranks, cut to whole global batches) and is handed to FFCV's
    `EpochIterator` directly; a mid-epoch resume simply starts that order at `start_batch * batch_size`.
    `order=quasi_random` (page-wise reads, for datasets larger than RAM with `os_cache=False`) instead gives each rank
    a fixed round-robin shard of the beton's positions and lets FFCV's `QuasiRandom` order it per epoch (seeded by
    `seed`); it mixes the classes only as well as the pages do, hence the shuffled storage of `byol convert`.
  - Storage order. `byol convert` stores the samples in a fixed shuffled order (see `pipeline.backends.ffcv.format`),
    with each sample's global index in the `index` field. Orders are computed over global indices (the same permutation
    as the other backends; `sequential` is the dataset order, read all over the file) and mapped to beton positions for
    FFCV; `Batch.index`, `epoch_order` and the crop seeds are global indices. A beton without an `index` field is taken
    to be in index order.
  - Interpolation. Each crop is resized with PIL's antialiased bicubic (`pipeline.resample.resize_crop_u8`, inside
    the compiled decoder), torchvision's `resized_crop` and the other backends' CPU crop, in place of the OpenCV
    `INTER_AREA` that FFCV 1.0.2's own decoder hard-codes (box averaging downscaling, nearest-neighbour-like
    upscaling) and in less time (~0.45 against ~0.7 ms a 224 px view). Upscaling is common: at 224 px from a beton
    stored at 256 px max side, ~96 % of BYOL's crops of a 4:3 image are upscaled in both axes (median factor 1.56);
    stored at 512 px, ~21 %. Store at a max side of about twice `image_size` for views with the detail of the
    source. JPEGs are decoded with libjpeg-turbo's fast DCT (about 1 grey level from the exact DCT). An `image_size`
    above the largest stored side (every crop upscaled) is refused at start-up.

Bad data: `byol convert` decoded every image before writing the beton and left out what it could not use; the loader
reads how many, and why, from the `convert_report.json` above `ffcv/train.beton` and reports them in `stats()`.
"""
from __future__ import annotations

import contextlib
import logging
import queue
from typing import Any, Iterator, Optional

import numba
import numpy as np
import torch

from byolfast.pipeline.augment_stream import AugmentStream
from byolfast.pipeline.config import DataConfig
from byolfast.pipeline.contract import Batch, DataError, LoaderContext, TwoViewLoader, to_contract
from byolfast.pipeline.storage import skipped_at_convert
from byolfast.pipeline.backends.ffcv.decode import (SeededEpochIterator, TwoViewCropFlipDecoder, ViewOf,
                                                     allocate_once, keep_torch_threads, view_seed)
from byolfast.pipeline.backends.ffcv.beton import (READ_ERRORS, check_beton, check_fields, field_metadata, read_classes,
                                                    resolve_beton)
from byolfast.pipeline.backends.ffcv.format import stored_in_class_order, stored_indices
from byolfast.pipeline.sharding import mix_seed, rank_indices, rank_seed

with keep_torch_threads():   # importing ffcv resets torch's thread count
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

logger = logging.getLogger(__name__)

ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM,
          "sequential": OrderOption.SEQUENTIAL}


class FfcvTwoViewLoader(TwoViewLoader):
    """Two BYOL views per image from an FFCV `.beton`, keeping the batch contract of `pipeline.contract`.

    Args:
        cfg: the data config; reads `path`, `image_size`, `num_workers` (FFCV's numba threads), `augment` and `ffcv`.
        ctx: the run context (device, dtype, batch size, rank / world size, seed).
        device_augment: run the colour augmentation on the device (BYOL); False delivers only crop + flip +
            normalise (to measure the CPU stage alone, or to look at the crops). Also an attribute, read per batch.

    `ctx.rank`, `ctx.world_size` and `ctx.seed` are read at the start of each epoch (the ranks' shares can thus be
    checked from one process); the batch size, the device and a quasi-random shard are fixed at construction.

    Raises:
        DataError: the beton is missing, damaged or lacks the fields, holds fewer images than one global batch, or
            only images smaller than `cfg.image_size`.
    """

    def __init__(self, cfg: DataConfig, ctx: LoaderContext, *, device_augment: bool = True):
        super().__init__(ctx)
        if cfg.ffcv.order not in ORDERS:
            raise DataError(f"unknown data.ffcv.order {cfg.ffcv.order!r}: choose one of {', '.join(ORDERS)}")
        self.cfg = cfg
        self.path = resolve_beton(cfg.path)
        reader = check_beton(self.path)
        check_fields(reader, self.path)
        self._num_samples = int(reader.num_samples)
        self.classes = read_classes(self.path, field_metadata(reader, "label"))
        images = field_metadata(reader, "image")
        self._stored_max_side = int(max(images["width"].max(), images["height"].max()))
        self._jpeg_fraction = float((images["mode"] == IMAGE_MODES["jpg"]).mean())
        self._check_image_size(images, cfg.image_size)
        self._has_index = "index" in reader.handlers
        # position -> global index (see `format`), and back
        self._index_of = (stored_indices(field_metadata(reader, "index"), self.path) if self._has_index
                          else np.arange(self._num_samples, dtype=np.int64))
        self._position_of = np.empty_like(self._index_of)
        self._position_of[self._index_of] = np.arange(self._num_samples)
        self._convert_skips = skipped_at_convert(self.path, self._num_samples)
        if self._convert_skips.get("convert_skipped"):
            logger.info("%s: %d images were skipped at convert time (see %s)", self.path,
                        self._convert_skips["convert_skipped"], self._convert_skips["convert_report"])

        self._quasi = cfg.ffcv.order == "quasi_random"
        if self._quasi and ctx.rank == 0 and stored_in_class_order(field_metadata(reader, "label")):
            logger.warning("%s stores its samples in class order (written by an earlier byol convert, or another tool):"
                           " data.ffcv.order=quasi_random then gives batches of fewer classes; convert again with "
                           "--overwrite, or use data.ffcv.order=random", self.path)
        self._pristine_pages: Optional[np.ndarray] = None   # quasi_random: FFCV's page table before any shuffle
        self._shuffle = ctx.shuffle and cfg.ffcv.order != "sequential"
        self.require_one_global_batch(repr(str(self.path)))

        aug = cfg.augment
        size = cfg.image_size
        self._decoder = TwoViewCropFlipDecoder((size, size), [(v.crop_scale, v.crop_ratio, v.flip_p)
                                                              for v in (aug.view1, aug.view2)])
        pipelines: dict[str, Any] = {name: None for name in reader.handlers}  # fields we do not use stay closed
        pipelines["image"] = [self._decoder, *self._image_ops(0, ctx.device)]
        pipelines["label"] = [IntDecoder(), ToTensor()]
        if self._has_index:
            pipelines["index"] = [IntDecoder(), ToTensor()]
        pipelines["image2"] = PipelineSpec(self._decoder, transforms=self._image_ops(1, ctx.device))

        shard = None
        if self._quasi:  # a fixed round-robin shard per rank, ordered page-wise by FFCV per epoch
            shard = np.arange(self._num_samples, dtype=np.int64)[ctx.rank::ctx.world_size]
        workers = max(1, cfg.num_workers)
        if workers > numba.config.NUMBA_NUM_THREADS:  # numba refuses more threads than it started with
            logger.warning("data.num_workers=%d exceeds the %d threads numba may use (CPU count or NUMBA_NUM_THREADS):"
                           " using %d", workers, numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
            workers = numba.config.NUMBA_NUM_THREADS
        try:
            with keep_torch_threads():
                self._loader = Loader(
                    str(self.path),
                    batch_size=ctx.batch_size,
                    num_workers=workers,
                    order=ORDERS["quasi_random"] if self._quasi else OrderOption.SEQUENTIAL,  # else: our orders
                    distributed=False,  # sharding by explicit orders, see the module docstring
                    # quasi: each rank orders its own shard
                    seed=rank_seed(ctx.seed, ctx.rank) % 2**31 if self._quasi else ctx.seed,
                    indices=shard,
                    pipelines=pipelines,
                    drop_last=True,
                    os_cache=cfg.ffcv.os_cache,
                    batches_ahead=cfg.ffcv.batches_ahead,
                )
        except READ_ERRORS as e:
            raise DataError(f"FFCV cannot read {str(self.path)!r} ({e}): delete it and run `byol convert` again") from e
        if self._quasi:
            self._pristine_pages = self._loader.traversal_order.page_to_samples_array.copy()
        allocate_once(self._loader.graph)
        self._decoder_node = self._loader.graph.operation_to_node[self._decoder][0].id
        self._outputs = list(self._loader.pipeline_specs)  # FFCV returns one tensor per pipeline, in this order

        from byolfast.pipeline.device_augment import BatchedViewAugment
        self.device_augment = device_augment
        self._augment = [BatchedViewAugment(spec, aug.mean, aug.std, size, color_ops=aug.color_ops).to(ctx.device)
                         for spec in (aug.view1, aug.view2)]
        self._mean = torch.tensor(aug.mean, dtype=torch.float32, device=ctx.device).view(1, 3, 1, 1)
        self._std = torch.tensor(aug.std, dtype=torch.float32, device=ctx.device).view(1, 3, 1, 1)
        self._generator = torch.Generator(device=ctx.device)
        # `data.ffcv.augment_stream`: the augmentation's own CUDA stream (None: the training stream; always on CPUs)
        self._side = AugmentStream(ctx.device) if cfg.ffcv.augment_stream and ctx.device.type == "cuda" else None
        self._epoch_side = None
        self._iterator: EpochIterator | None = None

    @staticmethod
    def _image_ops(view: int, device: torch.device) -> list:
        # one view's uint8 NHWC crops -> tensor -> the device -> an NCHW view in channels_last (no copy)
        return [ViewOf(view), ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]

    def _check_image_size(self, images: np.ndarray, size: int) -> None:
        """Refuse an `image_size` above every stored side; warn when some images (or most crops) are upsampled.

        An upscaled crop has less detail than the view it stands for (see the module docstring). Above the largest
        stored side, every crop of every image would be upscaled in both axes: a mistake, not a trade-off.
        """
        largest = self._stored_max_side
        if size > largest:
            raise DataError(f"data.image_size={size} is larger than every image stored in {str(self.path)!r} (largest "
                            f"side {largest} px): set data.image_size to at most {largest}, or run `byol convert "
                            f"--max-side {2 * size}` (at least {size}) on the source images again")
        longer = np.maximum(images["width"], images["height"])
        shorter = np.minimum(images["width"], images["height"])
        small = int((longer < size).sum())
        if small:
            logger.warning("%s: %d of %d stored images have a longer side under image_size=%d px (largest stored side "
                           "%d px): every crop of them is upsampled; convert at a larger max side for sharper views",
                           self.path, small, len(images), size, largest)
        elif (shorter < size).mean() > 0.5:
            logger.info("%s: most stored images have a shorter side under image_size=%d px, so most crops are upscaled "
                        "(softer than the source); a max side of ~%d px would avoid most of it",
                        self.path, size, 2 * size)

    # ------------------------------------------------------------------------------------------ contract methods

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The dataset (global) indices this rank visits in `epoch`, in order, `len(self) * batch_size` of them."""
        if self._quasi:
            return self._index_of[self._quasi_positions(epoch)]
        return self._rank_indices(epoch)

    def _epoch_positions(self, epoch: int) -> np.ndarray:
        """The beton positions this rank reads in `epoch`, in order (`epoch_order` mapped to the file)."""
        if self._quasi:
            return self._quasi_positions(epoch)
        return self._position_of[self._rank_indices(epoch)]

    def _rank_indices(self, epoch: int) -> np.ndarray:
        ctx = self.ctx
        return rank_indices(self._num_samples, ctx.batch_size, ctx.rank, ctx.world_size, ctx.seed, epoch,
                            self._shuffle)

    def _quasi_positions(self, epoch: int) -> np.ndarray:
        # FFCV's quasi-random order shuffles its page table in place, so each call would start from the state the
        # previous one left: restore the table first, so that an epoch's order depends on the epoch only.
        traversal = self._loader.traversal_order
        traversal.page_to_samples_array[...] = self._pristine_pages
        return np.asarray(traversal.sample_order(epoch), dtype=np.int64)[:len(self) * self.ctx.batch_size]

    def _iter_epoch(self) -> Iterator[Batch]:
        # Runs eagerly (the base class resets start_batch once this returns); the generator below does the work.
        epoch, first = self.epoch, self.start_batch
        # contiguous int64 always: another dtype or memory layout would make numba compile the pipeline again
        order = np.ascontiguousarray(self._epoch_positions(epoch)[first * self.ctx.batch_size:], dtype=np.int64)
        return self._batches_of(epoch, first, order)

    def _batches_of(self, epoch: int, first: int, order: np.ndarray) -> Iterator[Batch]:
        if len(order) == 0:
            return
        ctx = self.ctx
        seeds = [view_seed(ctx.seed, ctx.rank, epoch, v) for v in range(2)]
        self.close()  # one epoch thread at a time: numba's workqueue threading layer is not thread-safe
        if ctx.device.type == "cuda":   # once per epoch: the last epoch's copies and kernels read the reused buffers
            torch.cuda.synchronize(ctx.device)
        # With the side stream (the only stream that reads FFCV's device buffers: `_to_batch` reads them there, with
        # or without the augmentation), FFCV's iterator is created with it current: its copies are waited for
        # there, and its buffer-reuse events recorded there.
        self._epoch_side = self._side
        with keep_torch_threads(), (self._epoch_side.current() if self._epoch_side else contextlib.nullcontext()):
            it = self._iterator = SeededEpochIterator(self._loader, order, self._decoder_node, seeds, self._index_of)
        try:
            for b, out in enumerate(it, start=first):
                yield self._to_batch(dict(zip(self._outputs, out)), epoch, b)
        except Exception as e:
            if it.error is e:
                where = "between batches" if it.failed_batch is None else f"batch {first + it.failed_batch}"
                e.add_note(f"(in FFCV's epoch thread, reading {str(self.path)!r}: epoch {epoch}, {where})")
            raise
        finally:
            if self._iterator is it:  # a superseded generator, finalised late, must not stop the newer epoch
                self.close()

    def _to_batch(self, out: dict[str, torch.Tensor], epoch: int, batch: int) -> Batch:
        # FFCV's buffers are reused a few batches later: everything handed out is a fresh tensor.
        ctx = self.ctx
        side = self._epoch_side   # `device_augment` may change between batches: both branches read on the side
        with side.side(after_consumer=False) if side else contextlib.nullcontext():
            if self.device_augment:
                # a host-side call, no sync
                self._generator.manual_seed(mix_seed(rank_seed(ctx.seed, ctx.rank), epoch, batch, 2))
                # straight into the training dtype (the arithmetic in float32): `to_contract` has nothing to copy
                view1 = self._augment[0](out["image"], self._generator, dtype=ctx.dtype)
                view2 = self._augment[1](out["image2"], self._generator, dtype=ctx.dtype)
            else:
                view1, view2 = self._normalise(out["image"]), self._normalise(out["image2"])
        if side:
            view1, view2 = side.hand_over(view1, view2)
        labels = out["label"].view(-1).clone().to(ctx.device, non_blocking=True)
        index = out["index"].view(-1).clone() if self._has_index else None
        return Batch(to_contract(view1, ctx), to_contract(view2, ctx), labels, index)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0).sub_(self._mean).div_(self._std)

    @property
    def read_ahead(self) -> int:
        return self.cfg.ffcv.batches_ahead + 1   # FFCV's epoch thread runs that far ahead of the batch handed out

    def stats(self) -> dict:
        """The beton's size and storage, and what `byol convert` left out of it (`convert_skipped`, its reasons and
        report; absent when no report describes the beton)."""
        return {"samples": self._num_samples, "batches_per_epoch": len(self),
                "stored_max_side": self._stored_max_side, "jpeg_fraction": self._jpeg_fraction, **self._convert_skips}

    def close(self) -> None:
        """Stop the epoch in flight, if any, and wait for its thread (it finishes the batches it is decoding)."""
        it, self._iterator = self._iterator, None
        if it is None:
            return
        it.terminate_event.set()
        # The thread may be blocked putting a batch (or its closing None) into a full queue, which it does without
        # looking at the terminate event: keep the queue drained until it has finished.
        while it.is_alive():
            _drain(it.output_queue)
            it.join(0.05)
        it.close()
        # An abandoned generator of that epoch, if resumed, would wait forever on the queue: end it instead.
        _drain(it.output_queue)
        it.output_queue.put_nowait(None)


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return
