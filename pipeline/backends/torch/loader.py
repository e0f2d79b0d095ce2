"""The baseline two-view loader: an ImageFolder tree, PIL decoding, torchvision `transforms.v2` per sample on the CPU.

Each image is decoded once and both views are drawn from it in a `DataLoader` worker. Every random choice comes from
torch's CPU generator seeded per sample with `sample_seed(seed, epoch, index)`, so a batch depends only on the
seed, the epoch and its position in the epoch: not on the worker count, and a mid-epoch resume reproduces the rest of
the epoch without decoding the batches it skips. The dataset index is global, so ranks draw distinct randomness without
mixing the rank in, and N ranks with batch B see exactly the views one process with batch N*B sees.

Unlike the reference order (ToDtype last), the views turn float right after the crop and flip: the colour ops then run
on [0, 1] floats, as the on-device backends do, and solarisation's threshold keeps its meaning (0.5 of the range).
Colour jitter is torchvision's `ColorJitter` with `data.augment.color_ops=torchvision`, else `ReferenceColorJitter`
(the paper's maths, the default; see `pipeline.device_augment`).
"""
from __future__ import annotations

import functools
import logging
import signal
import struct
import zlib
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from byolfast.pipeline.augment_spec import OPS, blur_radius
from byolfast.pipeline.config import DataConfig, ViewSpec
from byolfast.pipeline.contract import Batch, DataError, LoaderContext, TwoViewLoader, to_contract
from byolfast.pipeline.device_augment import (BRIGHTNESS, CONTRAST, HUE, SATURATION, add_brightness, adjust_hue,
                                              blur_kernel_size, channel_contrast, hsv_saturation, jitter_ranges)
from byolfast.pipeline.folder import scan_image_folder
from byolfast.pipeline.rgb import exif_orientation, upright_rgb
from byolfast.pipeline.sharding import num_batches, rank_indices, sample_seed

logger = logging.getLogger(__name__)

# Above this many pixels a JPEG is decoded at a reduced DCT scale (PIL's draft mode), anything else is refused; PIL
# itself refuses images over 2 * Image.MAX_IMAGE_PIXELS (decompression bombs) when opening them.
MAX_DECODE_PIXELS = 1 << 26
# How many other samples to try in place of an undecodable one before giving up on the batch.
SUBSTITUTE_TRIES = 8
# What PIL raises on broken files: unidentified/truncated (OSError), broken headers (SyntaxError, struct.error,
# ValueError, IndexError), broken compressed streams (zlib.error, EOFError), bombs (DecompressionBombError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, IndexError, EOFError, struct.error, zlib.error,
                  Image.DecompressionBombError)


class ReferenceColorJitter(torch.nn.Module):
    """Colour jitter with the maths of DeepMind's BYOL reference (`color_ops=deepmind`, see `pipeline.device_augment`)
    on one float (3, H, W) image on [0, 1]: brightness adds a delta, contrast blends each channel with its mean,
    saturation scales HSV saturation, hue shifts HSV hue, each clipped to [0, 1], in a random order.

    Draws as `v2.ColorJitter` does, from torch's global generator: a permutation (`torch.randperm(4)`), then one
    uniform per op of non-zero strength (brightness, contrast, saturation, hue), so a seed draws the same numbers as
    torchvision's jitter, mapped to the reference's ranges (`jitter_ranges`); an op of strength 0 is skipped.
    """

    def __init__(self, spec: ViewSpec):
        super().__init__()
        ranges = jitter_ranges(spec, "deepmind")
        strengths = (spec.brightness, spec.contrast, spec.saturation, spec.hue)
        self.ranges = {op: ranges[name] for op, (name, s) in
                       enumerate(zip(("brightness", "contrast", "saturation", "hue"), strengths)) if s > 0}

    def make_params(self) -> tuple[list[int], dict[int, torch.Tensor]]:
        """The op order (op ids, 0 brightness .. 3 hue) and each drawn op's value, from torch's global generator."""
        order = torch.randperm(4).tolist()
        return order, {op: torch.empty(1).uniform_(lo, hi) for op, (lo, hi) in self.ranges.items()}

    @staticmethod
    def apply(img: torch.Tensor, order: list[int], values: dict[int, torch.Tensor]) -> torch.Tensor:
        """The ops of `values` (brightness delta, contrast and saturation factors, hue shift) in `order`."""
        x = img.unsqueeze(0)
        for op in order:
            if op not in values:
                continue
            if op == BRIGHTNESS:
                x = add_brightness(x, values[op])
            elif op == CONTRAST:
                x = channel_contrast(x, values[op])
            elif op == SATURATION:
                x = hsv_saturation(x, values[op])
            elif op == HUE:
                x = adjust_hue(x, values[op])   # the HSV shift of both maths
        return x.squeeze(0)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.apply(img, *self.make_params())


class SpecGaussianBlur(v2.GaussianBlur):
    """torchvision's `GaussianBlur` (the same sigma draw and kernel) with the spec's cut: `2 blur_radius + 1` taps
    (`augment_spec.blur_radius`, at most `kernel_size`), as every other engine; 3-17 taps at 224 px where torchvision
    convolves with 23, a difference under 0.03 grey level."""

    def transform(self, inpt, params):
        taps = [2 * blur_radius(params["sigma"][0], k) + 1 for k in self.kernel_size]
        return self._call_kernel(F.gaussian_blur, inpt, taps, **params)


def build_view_transform(spec: ViewSpec, image_size: int, mean: Sequence[float], std: Sequence[float],
                         color_ops: str = "deepmind") -> v2.Compose:
    """One view's BYOL augmentation as a torchvision `transforms.v2` pipeline on a uint8 (3, H, W) image, the ops in
    the spec's order (`augment_spec.OPS`); colour jitter with the reference's maths (`deepmind`) or torchvision's
    `ColorJitter` (`torchvision`)."""
    jitter_ranges(spec, color_ops)   # checks color_ops
    if color_ops == "torchvision":
        jitter = v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    else:
        jitter = ReferenceColorJitter(spec)
    steps = {
        "crop": v2.RandomResizedCrop(image_size, scale=spec.crop_scale, ratio=spec.crop_ratio,
                                     interpolation=InterpolationMode.BICUBIC, antialias=True),
        "flip": v2.RandomHorizontalFlip(spec.flip_p),
        "jitter": v2.RandomApply([jitter], p=spec.jitter_p),
        "grayscale": v2.RandomGrayscale(spec.grayscale_p),
        "blur": v2.RandomApply([SpecGaussianBlur(blur_kernel_size(image_size, spec.blur_kernel_frac),
                                                 sigma=spec.blur_sigma)], p=spec.blur_p),
        "solarize": v2.RandomSolarize(spec.solarize_threshold, p=spec.solarize_p),
        "normalise": v2.Normalize(list(mean), list(std)),
    }
    transforms = [steps[name] for name in OPS]   # the spec's order
    # uint8 through the crop and flip, float from the colour ops on (see the module's doc)
    transforms.insert(OPS.index("jitter"), v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(transforms)


def load_rgb(path: str) -> torch.Tensor:
    """Decode an image file to a uint8 (3, H, W) RGB tensor, whatever its mode (CMYK, gray, palette, 16-bit), turned
    upright as a JPEG's EXIF orientation says (as `byol convert` and the DALI decoders do).

    Raises:
        OSError, ValueError, ...: the file cannot be decoded (see `_DECODE_ERRORS`).
    """
    with Image.open(path) as img:
        w, h = img.size
        if w * h > MAX_DECODE_PIXELS:
            if img.format != "JPEG":
                raise ValueError(f"{w}x{h} image is larger than {MAX_DECODE_PIXELS} pixels")
            scale = int(np.ceil(np.sqrt(w * h / MAX_DECODE_PIXELS)))
            img.draft("RGB", (max(1, w // scale), max(1, h // scale)))
        rgb = upright_rgb(img, exif_orientation(img) or 1)  # malformed EXIF: as stored, like `byol convert`
        arr = np.array(rgb, dtype=np.uint8)  # forces the decode inside the `with`
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"decoded to an unexpected shape {arr.shape}")
    return torch.from_numpy(arr).permute(2, 0, 1)


class _Sample(NamedTuple):
    view1: torch.Tensor | None
    view2: torch.Tensor | None
    label: int
    index: int  # the sample actually shown (a substitute's index when the requested one was undecodable)
    bad: tuple[tuple[str, str], ...]  # (path, reason) of each file that failed on the way
    error: str = ""  # why neither it nor any substitute decodes (no views then): raised by the main process


class _Failure(NamedTuple):
    """A batch that cannot be made; the main process raises `message` as a `DataError`."""
    message: str


def _ignore_signals(names: tuple[str, ...], worker_id: int) -> None:
    """DataLoader worker start: ignore the trainer's preemption signals (run after torch's own worker handlers, which
    would make a SIGTERM to the process group kill the worker). The main process still stops the workers."""
    for name in names:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class TwoViewFolderDataset(Dataset):
    """Two augmented views of each image of a list of `(path, label)`; indexed by `(epoch, index)`.

    Args:
        samples: `(path, class_index)` pairs, as from `scan_image_folder`.
        transforms: the two views' pipelines (`build_view_transform`).
        seed: the run's seed (samples are told apart by their global index, so no rank is mixed in).
    """

    def __init__(self, samples: list[tuple[str, int]], transforms: tuple[v2.Compose, v2.Compose], seed: int):
        self.samples = samples
        self.transforms = transforms
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> _Sample:
        epoch, index = key
        seed = sample_seed(self.seed, epoch, index)
        try:
            image, src, bad = self._decode(index, seed)
        except DataError as e:
            # Returned, not raised: a DataLoader worker's exception reaches the main process re-raised with the
            # worker's traceback folded into its message, where the message alone is what the user needs.
            return _Sample(None, None, -1, index, (), str(e))
        # The global CPU generator is what transforms.v2 draws from; fork_rng restores it afterwards, so the
        # per-sample seeding does not touch the caller's stream when there are no workers. CPU only: the CUDA
        # generators are never reseeded. One intra-op thread, as in a DataLoader worker: the contrast's mean is a
        # reduction whose float rounding depends on the thread count, and batches must not depend on num_workers.
        threads = torch.get_num_threads()
        if threads != 1:
            torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                view1 = self.transforms[0](image)
                view2 = self.transforms[1](image)
        finally:
            if threads != 1:
                torch.set_num_threads(threads)
        return _Sample(view1, view2, self.samples[src][1], src, tuple(bad))

    def _decode(self, index: int, seed: int) -> tuple[torch.Tensor, int, list[tuple[str, str]]]:
        n = len(self.samples)
        bad: list[tuple[str, str]] = []
        src = index
        for attempt in range(SUBSTITUTE_TRIES + 1):
            path = self.samples[src][0]
            try:
                return load_rgb(path), src, bad
            except _DECODE_ERRORS as e:
                bad.append((path, f"{type(e).__name__}: {e}"))
            if n < 2:
                break
            # A deterministic other sample: depends on (seed, epoch, index, attempt) only, never on the worker.
            src = (index + 1 + sample_seed(seed, attempt, 1) % (n - 1)) % n
        raise DataError(f"cannot decode {', '.join(dict.fromkeys(p for p, _ in bad))} (a sample and "
                        f"{len(bad) - 1} substitutes; last error {bad[-1][1]}): check the images under the data path "
                        "(e.g. with PIL's Image.open)")


class EpochBatchSampler(Sampler):
    """This rank's batches of `(epoch, index)` keys for the epoch and start batch last set (read at each `iter`)."""

    def __init__(self, num_samples: int, ctx: LoaderContext):
        self.num_samples = num_samples
        self.ctx = ctx
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return max(0, num_batches(self.num_samples, self.ctx.batch_size, self.ctx.world_size) - self.start_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        c = self.ctx
        idx = rank_indices(self.num_samples, c.batch_size, c.rank, c.world_size, c.seed, self.epoch, c.shuffle)
        for b in range(self.start_batch, len(idx) // c.batch_size):
            yield [(self.epoch, int(i)) for i in idx[b * c.batch_size:(b + 1) * c.batch_size]]


def _collate(samples: list[_Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list] | _Failure:
    error = next((s.error for s in samples if s.error), "")
    if error:
        return _Failure(error)
    return (torch.stack([s.view1 for s in samples]), torch.stack([s.view2 for s in samples]),
            torch.tensor([s.label for s in samples], dtype=torch.int64),
            torch.tensor([s.index for s in samples], dtype=torch.int64),
            [b for s in samples for b in s.bad])


class TorchTwoViewLoader(TwoViewLoader):
    """torchvision `ImageFolder`-style tree + `DataLoader` workers + `transforms.v2`: the baseline backend.

    An undecodable file is replaced by a deterministic other sample (logged once, counted in `stats()`); the batch's
    `index` and `labels` are then the substitute's, i.e. those of the image actually shown.

    Args:
        cfg: the data config (`path`, `image_size`, `num_workers`, `augment`, `max_bad_fraction`).
        ctx: the run's loader context.

    Raises:
        DataError: the tree is missing/empty (see `scan_image_folder`), smaller than one global batch, or more than
            `cfg.max_bad_fraction` of an epoch fails to decode, or a sample and its substitutes all fail to decode
            (raised in this process, with worker processes too).
    """

    def __init__(self, cfg: DataConfig, ctx: LoaderContext):
        super().__init__(ctx)
        self.cfg = cfg
        self.samples, self.classes = scan_image_folder(cfg.path)
        self.require_one_global_batch(repr(cfg.path))
        aug = cfg.augment
        transforms = (build_view_transform(aug.view1, cfg.image_size, aug.mean, aug.std, aug.color_ops),
                      build_view_transform(aug.view2, cfg.image_size, aug.mean, aug.std, aug.color_ops))
        self.dataset = TwoViewFolderDataset(self.samples, transforms, seed=ctx.seed)
        self._sampler = EpochBatchSampler(len(self.samples), ctx)
        workers = cfg.num_workers
        self._loader = DataLoader(self.dataset, batch_sampler=self._sampler, num_workers=workers,
                                  collate_fn=_collate, pin_memory=ctx.device.type == "cuda",
                                  persistent_workers=workers > 0,
                                  worker_init_fn=functools.partial(_ignore_signals, ctx.worker_ignored_signals))
        self._bad: dict[str, str] = {}  # path -> reason, each logged once

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def _iter_epoch(self) -> Iterator[Batch]:
        # Read epoch/start now: the base class resets start_batch as soon as this returns.
        return self._batches(self.epoch, self.start_batch)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        ctx = self.ctx
        self._sampler.set_epoch(epoch, start_batch)
        allowed = self.cfg.max_bad_fraction * len(self) * ctx.batch_size
        epoch_bad: list[str] = []
        for batch in self._loader:
            if isinstance(batch, _Failure):
                raise DataError(batch.message)
            view1, view2, labels, index, bad = batch
            if bad:
                self._record_bad(bad)
                epoch_bad.extend(p for p, _ in bad)
                if len(epoch_bad) > allowed:
                    files = sorted(set(epoch_bad))
                    raise DataError(
                        f"{len(epoch_bad)} images of epoch {epoch} failed to decode, more than data.max_bad_fraction"
                        f"={self.cfg.max_bad_fraction} of {len(self) * ctx.batch_size}: {', '.join(files[:20])}"
                        f"{' ...' if len(files) > 20 else ''} (fix or remove them, or raise data.max_bad_fraction)")
            yield Batch(to_contract(view1, ctx), to_contract(view2, ctx),
                        labels.to(ctx.device, non_blocking=True), index)

    def _record_bad(self, bad: list[tuple[str, str]]) -> None:
        for path, reason in bad:
            if path not in self._bad:
                self._bad[path] = reason
                logger.warning("cannot decode %s (%s): substituting another image", path, reason)

    @property
    def read_ahead(self) -> int:
        # DataLoader's default prefetch_factor (2 batches per worker), plus the pinning thread's batch on CUDA
        workers = self._loader.num_workers
        return 2 * workers + (1 if workers and self._loader.pin_memory else 0)

    def stats(self) -> dict:
        """`bad_images`: distinct undecodable files met so far; `bad_paths`: their paths."""
        return {"bad_images": len(self._bad), "bad_paths": sorted(self._bad)}

    def close(self) -> None:
        """Stop the persistent workers (the DataLoader keeps its iterator, and so its workers, between epochs)."""
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._loader._iterator = None
