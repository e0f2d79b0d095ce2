"""CPU milliseconds per image of each stage of the ffcv backend, both views: where a loader's time goes.

Stages, in the loader's order (per image; the crop, flip, hand-over and colour stages count both views):
  - decode: the JPEG decode into the scratch buffer (libjpeg-turbo through FFCV's `imdecode`; raw images skip it);
  - crop: the seeded draws (`crop_flip_params`) and the resize of each view's crop (`resample.resize_crop_u8`, the
    decoder's);
  - flip: the in-place horizontal flip of the views that draw it;
  - hand_over: each view's crops into the tensor FFCV hands on (`ToDevice`'s copy, on the CPU);
  - colour: jitter in each sample's op order and grayscale;
  - blur: the gaussian blur of the samples that draw it;
  - normalise: uint8 -> float, the flip and the mean/std normalisation (the kernel with no op drawn);
  - augment_other: the rest of the loader's CPU colour path (its draws, solarize, layouts and allocations).
colour and blur are passes of the loader's fused kernel (`BatchedViewAugment.apply_cpu`) with only that group's
coins kept as drawn, less the all-off pass (`normalise`), floored at 0.
decode, crop and flip run the primitives of `pipeline.backends.ffcv.decode.TwoViewCropFlipDecoder` in separate loops
(the decoder fuses them); the colour stages run the loader's own `BatchedViewAugment.apply_cpu`.
Everything runs in the calling thread, one thread (thread CPU time, robust to a shared machine): the CPU cost a
loader pays, whatever number of workers spreads it. On a GPU the colour stages run on the device instead.
`byol bench --what stages` runs this beside the other backends' timers (`benchmarks.stages`).
"""
from __future__ import annotations

import time

import numba
import numpy as np
import torch

from byolfast.benchmarks.stages import clock, median_ms, one_torch_thread
from byolfast.pipeline.config import DataConfig
from byolfast.pipeline.resample import resize_crop_u8
from byolfast.pipeline.backends.ffcv.decode import crop_flip_params, flip_columns, keep_torch_threads, view_seed

with keep_torch_threads():
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode
    from ffcv.reader import Reader

STAGES = ("decode", "crop", "flip", "hand_over", "colour", "blur", "normalise", "augment_other")
# The colour path runs every op of a sample in one kernel (`cpu_augment.augment_view_hwc`): its stages are timed as
# passes of that kernel with only some ops' coins kept as drawn (`normalise`: none), less the all-off pass.
_COINS = ("jitter", "grayscale", "blur", "solarize")
OPS_ON = {"normalise": (), "colour": ("jitter", "grayscale"), "blur": ("blur",)}
_imdecode = numba.njit(imdecode)


@numba.njit
def _decode(data, ptrs, sizes, heights, widths, is_jpeg, decoded):
    for k in range(len(ptrs)):
        if is_jpeg[k]:
            _imdecode(data[ptrs[k]:ptrs[k] + sizes[k]], decoded[k], heights[k], widths[k], heights[k], widths[k],
                      0, 0, 1, 1, False, False)


@numba.njit
def _crop(decoded, heights, widths, seeds, index, scale, ratio, flip_p, views, flips):
    for k in range(len(index)):
        h0, w0 = heights[k], widths[k]
        image = decoded[k, :3 * h0 * w0].reshape((h0, w0, 3))
        for v in range(2):
            i, j, h, w, flip = crop_flip_params(seeds[v], index[k], h0, w0, scale[v], ratio[v], flip_p[v])
            resize_crop_u8(views[v, k], image, i, j, h, w)
            flips[v, k] = flip


@numba.njit
def _flip(views, flips):
    for v in range(2):
        for k in range(views.shape[1]):
            if flips[v, k]:
                flip_columns(views[v, k])


def ffcv_stage_ms(cfg: DataConfig, batch_size: int, *, max_images: int = 256, repeats: int = 3,
                  seed: int = 0) -> dict[str, float]:
    """CPU ms per image of each stage (`STAGES`, and `total`) on the first `max_images` images of `cfg.path`'s
    beton, at `cfg.image_size` with `cfg.augment`, in batches of `batch_size`; the median over `repeats` passes
    (after one untimed pass: numba compiles on first use)."""
    from byolfast.pipeline import device_augment
    from byolfast.pipeline.backends.ffcv.beton import resolve_beton

    path = resolve_beton(cfg.path)
    reader = Reader(str(path))
    names = list(reader.handlers)
    meta = reader.metadata[f"f{names.index('image')}"][:max_images]
    n = (len(meta) // batch_size) * batch_size or len(meta)
    meta = meta[:n]
    index = (reader.metadata[f"f{names.index('index')}"][:n] if "index" in names else np.arange(n)).astype(np.int64)
    size_of = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    ptrs = meta["data_ptr"].astype(np.int64)
    sizes = np.array([size_of[p] for p in ptrs.tolist()], dtype=np.int64)
    heights, widths = meta["height"].astype(np.int64), meta["width"].astype(np.int64)
    is_jpeg = meta["mode"] == IMAGE_MODES["jpg"]
    decoded = np.zeros((n, int((heights * widths).max()) * 3), dtype=np.uint8)
    for k in np.flatnonzero(~is_jpeg):   # raw images are cropped where they lie: no decode to time
        decoded[k, :sizes[k]] = data[ptrs[k]:ptrs[k] + sizes[k]]
    aug, s = cfg.augment, cfg.image_size
    specs = (aug.view1, aug.view2)
    scale = np.array([v.crop_scale for v in specs], dtype=np.float64)
    ratio = np.array([v.crop_ratio for v in specs], dtype=np.float64)
    flip_p = np.array([v.flip_p for v in specs], dtype=np.float64)
    seeds = np.array([view_seed(seed, 0, 0, v) for v in range(2)], dtype=np.int64)
    views = np.empty((2, n, s, s, 3), dtype=np.uint8)
    flips = np.zeros((2, n), dtype=np.bool_)
    handed = torch.empty((batch_size, s, s, 3), dtype=torch.uint8)
    augment = [device_augment.BatchedViewAugment(v, aug.mean, aug.std, s, color_ops=aug.color_ops) for v in specs]
    generator = torch.Generator().manual_seed(seed)

    def one_pass() -> dict[str, float]:
        seconds = dict.fromkeys(STAGES, 0.0)
        clock(seconds, "decode", _decode, data, ptrs, sizes, heights, widths, is_jpeg, decoded)
        clock(seconds, "crop", _crop, decoded, heights, widths, seeds, index, scale, ratio, flip_p, views, flips)
        clock(seconds, "flip", _flip, views, flips)
        whole = 0.0
        passes = dict.fromkeys(OPS_ON, 0.0)
        for b in range(0, n, batch_size):
            for v in range(2):
                crops = torch.from_numpy(views[v, b:b + batch_size])
                clock(seconds, "hand_over", handed[:len(crops)].copy_, crops)
                x = handed[:len(crops)]
                t = time.thread_time()
                augment[v](x, generator)   # the loader's call: the draws, then the fused kernel
                whole += time.thread_time() - t
                drawn = augment[v].sample_params(len(crops), "cpu", generator)
                for name, on in OPS_ON.items():   # the kernel again with only these ops drawn where they were
                    params = {k: (p if k not in _COINS or k in on else torch.zeros_like(p)) for k, p in drawn.items()}
                    t = time.thread_time()
                    augment[v].apply_cpu(x, params)
                    passes[name] += time.thread_time() - t
        seconds["normalise"] = passes["normalise"]
        for stage in ("colour", "blur"):   # each op group's pass less the all-off pass, floored at 0
            seconds[stage] = max(0.0, passes[stage] - passes["normalise"])
        seconds["augment_other"] = max(0.0, whole - seconds["colour"] - seconds["blur"] - seconds["normalise"])
        return seconds

    with one_torch_thread():   # the kernels then run in this thread (cpu_augment reads torch's count)
        return median_ms(one_pass, STAGES, n, repeats)
