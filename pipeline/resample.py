"""The random resized crop's resize as a numba kernel: PIL's antialiased bicubic (torchvision's `resized_crop` on
PIL images; the torch backend crops uint8 tensors with torch's antialiased bicubic, 97 % of the pixels PIL's), for
the engines that crop on the CPU inside their own kernels.

`resize_crop(out, img, top, left, height, width)` resizes the window `img[top:top + height, left:left + width]` of a
uint8 (H, W, 3) image into float32 (S, S, 3) `out` on [0, 1], rounded to whole grey levels as PIL's uint8 result is
(DALI's CPU operator); `resize_crop_u8` writes the same levels as uint8 (the FFCV decoder).
PIL's convolution resampler, in float32: each output pixel is a normalised sum over the input pixels within the
filter's support, the support widened by the scale when downscaling (the antialiasing), the window cut out first
(torchvision crops, then resizes: pixels outside the window never count). Keys' cubic with a = -0.5 (PIL's).
Two passes, each clipped and rounded to uint8 levels, in the order Pillow 13 takes (`_resize_levels`); PIL sums in
fixed point where this sums in float32, so outputs agree with PIL's within one grey level at the rare half-way
roundings, 99.99 % of the pixels exactly (`tests/test_resample.py`).

Cost at 224 px from a 500x375 photograph: ~0.45 ms a view on one core, where DALI's CPU `fn.resize` (antialiased
cubic, its own filter) takes ~2.2 ms, PIL ~1.3 ms and FFCV's OpenCV `INTER_AREA` ~0.7 ms; both passes run along
contiguous rows.
"""
from __future__ import annotations

import math

import numba
import numpy as np

_F = np.float32
_A = -0.5   # PIL's bicubic


@numba.njit(inline="always")
def _cubic(x):
    x = abs(x)
    if x < 1.0:
        return ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * _A
    return 0.0


@numba.njit(inline="always")
def _level(v):
    # PIL's uint8 result of a pass: clipped to [0, 255] and rounded half up
    return _F(np.floor(min(max(v, _F(0.0)), _F(255.0)) + _F(0.5)))


@numba.njit(nogil=True, cache=True)
def coefficients(in_size, out_size):
    """PIL's `precompute_coeffs` for bicubic: (first input index, taps) per output index, and the normalised
    float32 weights, (out_size, max taps)."""
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = 2.0 * fscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.empty((out_size, 2), dtype=np.int64)
    weights = np.zeros((out_size, ksize), dtype=np.float32)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        total = 0.0
        taps = np.empty(hi - lo, dtype=np.float64)
        for j in range(hi - lo):
            taps[j] = _cubic((j + lo - center + 0.5) / fscale)
            total += taps[j]
        for j in range(hi - lo):
            weights[i, j] = taps[j] / total if total != 0.0 else 0.0
        bounds[i, 0], bounds[i, 1] = lo, hi - lo
    return bounds, weights


@numba.njit(nogil=True)
def _rows(dst, src, bounds, weights):
    # dst[i] = level(sum_j w_ij src[lo_i + j]) over whole rows: float32 C-contiguous (n_in, m) -> (n_out, m); the
    # inner loops run along contiguous rows, so they vectorise
    m = src.shape[1]
    for i in range(dst.shape[0]):
        lo, n = bounds[i, 0], bounds[i, 1]
        acc = dst[i]
        w = weights[i, 0]
        row = src[lo]
        for k in range(m):
            acc[k] = w * row[k]
        for j in range(1, n):
            w = weights[i, j]
            row = src[lo + j]
            for k in range(m):
                acc[k] += w * row[k]
        for k in range(m):
            acc[k] = _level(acc[k])


@numba.njit(nogil=True)
def _transposed(src):
    # (A, B, 3) -> float32 C-contiguous (B, A * 3): pixel (a, b) to row b, so that a pass along A runs on rows
    a_n, b_n = src.shape[0], src.shape[1]
    dst = np.empty((b_n, a_n * 3), dtype=np.float32)
    for a in range(a_n):
        for b in range(b_n):
            for c in range(3):
                dst[b, 3 * a + c] = _F(src[a, b, c])
    return dst


@numba.njit(nogil=True)
def _resize_levels(rows, img, top, left, height, width, oh, ow):
    # the window's antialiased bicubic resize as grey levels (whole numbers in [0, 255]) into float32 C-contiguous
    # (oh, ow * 3) `rows`. Columns first, unless the rows shrink by more than twice what the columns shrink (or the
    # rows shrink while the columns grow): then rows first, the order Pillow 13 takes (measured on 398 windows where
    # the orders differ; the wrong order moves ~19 % of a crop's pixels by a grey level). Both passes run along
    # contiguous rows: the columns' pass on the transposed image.
    if height < 1 or width < 1 or top < 0 or left < 0 or top + height > img.shape[0] or left + width > img.shape[1]:
        raise ValueError("resize_crop: the crop window lies outside the image")
    xb, xw = coefficients(width, ow)
    yb, yw = coefficients(height, oh)
    window = img[top:top + height, left:left + width]
    if not (height > oh and height - oh > 2 * (width - ow)):
        cols = np.empty((ow, height * 3), dtype=np.float32)
        _rows(cols, _transposed(window), xb, xw)                   # (width, height) -> (ow, height)
        _rows(rows, _transposed(cols.reshape(ow, height, 3)), yb, yw)   # (height, ow) -> (oh, ow)
    else:
        first = np.empty((oh, width * 3), dtype=np.float32)
        flat = np.empty((height, width * 3), dtype=np.float32)
        for y in range(height):
            for x in range(width):
                for c in range(3):
                    flat[y, 3 * x + c] = _F(window[y, x, c])
        _rows(first, flat, yb, yw)                                  # (height, width) -> (oh, width)
        cols = np.empty((ow, oh * 3), dtype=np.float32)
        _rows(cols, _transposed(first.reshape(oh, width, 3)), xb, xw)   # (width, oh) -> (ow, oh)
        back = cols.reshape(ow, oh, 3)
        for y in range(oh):
            for x in range(ow):
                for c in range(3):
                    rows[y, 3 * x + c] = back[x, y, c]


@numba.njit(nogil=True, cache=True)
def resize_crop(out, img, top, left, height, width):
    """The window (top, left, height, width) of uint8 (H, W, 3) `img` -> float32 C-contiguous (S, S', 3) `out` on
    [0, 1], antialiased bicubic, each pass clipped and rounded to grey levels, in Pillow's order of passes."""
    oh, ow = out.shape[0], out.shape[1]
    rows = out.reshape(oh, ow * 3)
    _resize_levels(rows, img, top, left, height, width, oh, ow)
    for y in range(oh):
        for k in range(ow * 3):
            rows[y, k] *= _F(1.0 / 255.0)


@numba.njit(nogil=True, cache=True)
def resize_crop_u8(out, img, top, left, height, width):
    """`resize_crop` into uint8 C-contiguous (S, S', 3) `out`: PIL's uint8 result (the FFCV decoder's crops)."""
    oh, ow = out.shape[0], out.shape[1]
    levels = np.empty((oh, ow * 3), dtype=np.float32)
    _resize_levels(levels, img, top, left, height, width, oh, ow)
    rows = out.reshape(oh, ow * 3)
    for y in range(oh):
        for k in range(ow * 3):
            rows[y, k] = np.uint8(levels[y, k])
