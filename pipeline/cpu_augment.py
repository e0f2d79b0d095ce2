"""The CPU twin of `pipeline.device_augment`: BYOL's colour augmentation as per-pixel numba kernels over NHWC images.

On a GPU the batched torch module runs each op as one pass over the whole batch, masking the samples that skip it;
that is the right shape for a GPU and the wrong one for a CPU: at 224 px a pass over a batch of 32 float images moves
19 MB, the hue alone is ~40 such passes, and a masked sample pays for every op it skips. Here each sample runs only
its own ops, in its own order, one image at a time while it sits in cache, every op a loop over pixels
(`augment_view_hwc`, one sample; `STAGES`, its passes):
  - uint8 -> float [0, 1], then brightness / contrast / saturation / hue in the sample's order, then grayscale
    (`_jitter_grayscale_float`): the same formulas as the torch module, in float32, per pixel (its `deepmind` maths,
    the reference's, when `reference` is set; else torchvision's);
  - `_blur_one`: the separable gaussian where drawn, over the spec's taps (cut at 4 sigma), row by row;
  - solarize, the flip and the mean/std normalisation in one pass along rows.
`augment_crops` runs it on a batch of crops (the FFCV backend's CPU path), `crop_augment_view_hwc` after the crop's
resize (DALI's CPU operator). The op order,
the luma weights, the jitter op ids and the draws are `pipeline.augment_spec`'s; the draws are the torch module's
(`BatchedViewAugment.sample_params`), so a seed gives the same views on either path. `tests/test_augment_spec.py` and
`tests/test_device_augment.py` hold this path to the torch module (which is held to torchvision).

Samples run in parallel on `threads` Python threads (the kernels release the GIL). The kernels compile on first use
(a few seconds) and are cached on disk beside this file. numba bakes the spec's constants into that cache, which it
keys by this file only: after changing them in `augment_spec`, delete `__pycache__/cpu_augment*.nb*` (the
conformance test fails until then).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

from byolfast.pipeline.augment_spec import BLUR_TRUNCATE as _BLUR_TRUNCATE
from byolfast.pipeline.augment_spec import BRIGHTNESS, CONTRAST, DRAW, HUE, LUMA, SATURATION
from byolfast.pipeline.config import ViewSpec
from byolfast.pipeline.resample import resize_crop

_F = np.float32
_LUMA_R, _LUMA_G, _LUMA_B = (_F(w) for w in LUMA)
_ZERO, _ONE = _F(0.0), _F(1.0)
_TO01 = _F(1.0 / 255.0)


@numba.njit(inline="always")
def _clamp01(v):
    return min(max(v, _ZERO), _ONE)


@numba.njit(inline="always")
def _gray(r, g, b):
    # torchvision's rgb_to_grayscale: r * 0.2989 + g * 0.587 + b * 0.114, in float32.
    return r * _LUMA_R + g * _LUMA_G + b * _LUMA_B


@numba.njit
def _brightness(img, factor):
    h, w, _ = img.shape
    for y in range(h):
        for x in range(w):
            for c in range(3):
                img[y, x, c] = _clamp01(img[y, x, c] * factor)


@numba.njit
def _contrast(img, factor):
    # Blend with the mean of the image's grayscale (accumulated in float64, rounded once).
    h, w, _ = img.shape
    total = 0.0
    for y in range(h):
        for x in range(w):
            total += _gray(img[y, x, 0], img[y, x, 1], img[y, x, 2])
    mean_term = _F(total / (h * w)) * (_ONE - factor)
    for y in range(h):
        for x in range(w):
            for c in range(3):
                img[y, x, c] = _clamp01(mean_term + img[y, x, c] * factor)


@numba.njit
def _saturation(img, factor):
    h, w, _ = img.shape
    rest = _ONE - factor
    for y in range(h):
        for x in range(w):
            gray_term = _gray(img[y, x, 0], img[y, x, 1], img[y, x, 2]) * rest
            for c in range(3):
                img[y, x, c] = _clamp01(img[y, x, c] * factor + gray_term)


@numba.njit
def _add_brightness(img, delta):
    # The reference's brightness: x + delta.
    h, w, _ = img.shape
    for y in range(h):
        for x in range(w):
            for c in range(3):
                img[y, x, c] = _clamp01(img[y, x, c] + delta)


@numba.njit
def _channel_contrast(img, factor):
    # The reference's contrast: blend each channel with its own mean (accumulated in float64, rounded once).
    h, w, _ = img.shape
    totals = np.zeros(3)
    for y in range(h):
        for x in range(w):
            for c in range(3):
                totals[c] += img[y, x, c]
    rest = _ONE - factor
    terms = np.empty(3, dtype=np.float32)
    for c in range(3):
        terms[c] = _F(totals[c] / (h * w)) * rest
    for y in range(h):
        for x in range(w):
            for c in range(3):
                img[y, x, c] = _clamp01(terms[c] + img[y, x, c] * factor)


@numba.njit
def _hsv_saturation(img, factor):
    # The reference's saturation, S -> clip(S * f, 0, 1) in HSV, in the torch module's closed form:
    # out = V - (V - x) * min(max(f, 0), V / (V - min)). Factor 1 is the identity.
    if factor == _ONE:
        return
    f = max(factor, _ZERO)
    h, w, _ = img.shape
    for y in range(h):
        for x in range(w):
            r, g, b = img[y, x, 0], img[y, x, 1], img[y, x, 2]
            maxc = max(r, g, b)
            chroma = maxc - min(r, g, b)
            if chroma == _ZERO:   # grey: unchanged
                continue
            k = min(f, maxc / chroma)
            for c in range(3):
                img[y, x, c] = _clamp01(maxc - (maxc - img[y, x, c]) * k)


@numba.njit(inline="always")
def _pick(i, a0, a1, a2, a3, a4, a5):
    # a_i for the sextant i in 0..5, as selects (no branch)
    lo = a0 if i == 0 else (a1 if i == 1 else a2)
    hi = a3 if i == 3 else (a4 if i == 4 else a5)
    return lo if i < 3 else hi


@numba.njit(error_model="numpy")
def _hue(img, shift):
    # torchvision's _rgb_to_hsv, the hue shift `(h + shift) % 1`, then _hsv_to_rgb, per pixel in float32. The
    # remainders are written as the one subtraction they amount to on these ranges (exact, as fmod/remainder are).
    # Row by row, so that LLVM vectorises it: a row's r, g, b go to three lines, the pixels run without a branch
    # (selects, torchvision's divisions; numpy's error model drops the zero-division checks: the divisors are never
    # 0) and go back. A grey pixel (crange 0: hue 0, saturation 0, (v, v, v) in every sextant) is kept as it is.
    h_, w_, _ = img.shape
    src = np.ascontiguousarray(img)        # img itself when C-contiguous, else a copy (written back below)
    rows = src.reshape(h_, w_ * 3)
    rl = np.empty(w_, dtype=np.float32)
    gl = np.empty(w_, dtype=np.float32)
    bl = np.empty(w_, dtype=np.float32)
    for y in range(h_):
        row = rows[y]
        for x in range(w_):
            rl[x], gl[x], bl[x] = row[3 * x], row[3 * x + 1], row[3 * x + 2]
        for x in range(w_):
            r, g, b = rl[x], gl[x], bl[x]
            maxc = max(r, g, b)
            crange = maxc - min(r, g, b)
            grey = crange == _ZERO
            cdiv = _ONE if grey else crange
            s = crange / (_ONE if grey else maxc)
            rc = (maxc - r) / cdiv
            gc = (maxc - g) / cdiv
            bc = (maxc - b) / cdiv
            hue = bc - gc if maxc == r else ((_F(2.0) + rc - bc) if maxc == g else (_F(4.0) + gc - rc))
            hue = hue / _F(6.0) + _ONE            # in [5/6, 2): fmod(., 1) is one exact subtraction
            hue = hue - _ONE if hue >= _ONE else hue
            hue = hue + shift                      # shift in [-0.5, 0.5]: remainder(., 1) is +1 or -1
            hue = hue + _ONE if hue < _ZERO else (hue - _ONE if hue >= _ONE else hue)
            h6 = hue * _F(6.0)
            i = np.int32(h6)                       # h6 >= 0: truncation is floor
            f = h6 - _F(i)
            i = i - np.int32(6) if i >= np.int32(6) else i
            v = maxc
            sxf = s * f
            p = _clamp01((_ONE - s) * v)
            q = _clamp01((_ONE - sxf) * v)
            t = _clamp01((sxf + (_ONE - s)) * v)
            rl[x] = r if grey else _pick(i, v, q, p, p, t, v)
            gl[x] = g if grey else _pick(i, t, v, v, q, p, p)
            bl[x] = b if grey else _pick(i, p, p, t, v, v, q)
        for x in range(w_):
            row[3 * x], row[3 * x + 1], row[3 * x + 2] = rl[x], gl[x], bl[x]
    if not img.flags.c_contiguous:
        img[...] = src


@numba.njit
def _grayscale(img):
    h, w, _ = img.shape
    for y in range(h):
        for x in range(w):
            v = _gray(img[y, x, 0], img[y, x, 1], img[y, x, 2])
            img[y, x, 0], img[y, x, 1], img[y, x, 2] = v, v, v


@numba.njit(nogil=True)
def _jitter_grayscale_float(img, jitter, order, brightness, contrast, saturation, hue, with_hue, grayscale,
                            reference):
    # One sample's jitter ops in its order, then grayscale, on a float32 [0, 1] image, in place; `reference`: the
    # reference's brightness, contrast and saturation (brightness a delta), else torchvision's.
    if jitter:
        for k in range(4):
            op = order[k]
            if op == BRIGHTNESS:
                if reference:
                    _add_brightness(img, brightness)
                else:
                    _brightness(img, brightness)
            elif op == CONTRAST:
                if reference:
                    _channel_contrast(img, contrast)
                else:
                    _contrast(img, contrast)
            elif op == SATURATION:
                if reference:
                    _hsv_saturation(img, saturation)
                else:
                    _saturation(img, saturation)
            elif op == HUE and with_hue:
                _hue(img, hue)
    if grayscale:
        _grayscale(img)


@numba.njit(inline="always")
def _reflect(i, n):
    # torch's reflect padding (F.pad mode="reflect"): -1 -> 1, n -> n - 2; the radius is below n.
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


@numba.njit(nogil=True)
def _blur_one(img, tmp, sigma, max_radius):
    # One float32 (H, W, 3) C-contiguous image in place: the separable gaussian of `sigma` over the spec's taps
    # (`augment_spec.blur_radius`: at most `max_radius` a side, cut at BLUR_TRUNCATE sigmas), reflect padding, the
    # torch module's kernel (torchvision's construction) and its order of sums (tap by tap, rows then columns).
    # `tmp`: scratch of at least (H, (W + 2 radius) * 3) float32. Each pass runs along whole contiguous rows, so the
    # inner loops vectorise.
    r = min(max_radius, int(np.ceil(_F(_BLUR_TRUNCATE) * sigma)))
    if r <= 0:
        return
    h, w = img.shape[0], img.shape[1]
    # softmax(-((d / sqrt 2) / sigma)^2) in float32, the taps of `device_ops.gaussian_kernels`
    taps = np.empty(2 * r + 1, dtype=np.float32)
    total = _ZERO
    for k in range(2 * r + 1):
        x = _F(k - r) / _F(np.sqrt(2.0)) / sigma
        taps[k] = np.exp(-(x * x))
        total += taps[k]
    for k in range(2 * r + 1):
        taps[k] = taps[k] / total
    rows = img.reshape(h, w * 3)
    # vertical pass into tmp, each row written at its left padding's offset
    for y in range(h):
        out = tmp[y, 3 * r:3 * r + w * 3]
        src = rows[_reflect(y - r, h)]
        t = taps[0]
        for j in range(w * 3):
            out[j] = src[j] * t
        for k in range(1, 2 * r + 1):
            src = rows[_reflect(y + k - r, h)]
            t = taps[k]
            for j in range(w * 3):
                out[j] += src[j] * t
    # horizontal pass back into img, after filling each row's reflected margins
    for y in range(h):
        line = tmp[y]
        for x in range(1, r + 1):
            for c in range(3):
                line[3 * (r - x) + c] = line[3 * (r + x) + c]
                line[3 * (r + w - 1 + x) + c] = line[3 * (r + w - 1 - x) + c]
        out = rows[y]
        t = taps[0]
        for j in range(w * 3):
            out[j] = line[j] * t
        for k in range(1, 2 * r + 1):
            t = taps[k]
            for j in range(w * 3):
                out[j] += line[j + 3 * k] * t
    return


def _over_samples(kernel, n: int, threads: int, *args) -> None:
    # The kernels release the GIL: each thread takes every `threads`-th sample (per-sample work varies). Plain
    # Python threads rather than numba's parallel loops, whose default (workqueue) layer must not be entered from two
    # threads at once, and FFCV runs its own numba pipeline in a thread of its own.
    threads = max(1, min(threads, n))
    if threads == 1:
        kernel(np.arange(n), *args)
        return
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(kernel, np.arange(t, n, threads), *args) for t in range(threads)]:
            f.result()


# --- uint8 HWC, one sample: the form DALI's numba operator calls (see `pipeline.dali_augment.cpu_augment_view`) ------
# The packed float32 vector of one sample's parameters, (name, width) in order: the spec's draws of the ops after the
# crop (the jitter order as op ids; 0/1 for coins) and the two flags the kernel needs (hue on, the reference's maths).
KERNEL_PARAMS = (("jitter", 1), ("order", DRAW["order"].width), ("brightness", 1), ("contrast", 1),
                 ("saturation", 1), ("hue", 1), ("hue_on", 1), ("grayscale", 1), ("reference", 1), ("blur", 1),
                 ("sigma", 1), ("solarize", 1), ("flip", 1))
_AT = {name: sum(w for _, w in KERNEL_PARAMS[:i]) for i, (name, _) in enumerate(KERNEL_PARAMS)}
VIEW_PARAMS = sum(w for _, w in KERNEL_PARAMS)
_P_JITTER, _P_ORDER, _P_B, _P_C, _P_S, _P_H = (_AT[k] for k in ("jitter", "order", "brightness", "contrast",
                                                                "saturation", "hue"))
_P_HUE_ON, _P_GRAY, _P_REF, _P_WIDTH = _AT["hue_on"], _AT["grayscale"], _AT["reference"], DRAW["order"].width
_P_BLUR, _P_SIGMA, _P_SOL, _P_FLIP = _AT["blur"], _AT["sigma"], _AT["solarize"], _AT["flip"]


@numba.njit(nogil=True, cache=True)
def augment_view_hwc(out, img, params, max_radius, threshold, mean, std):
    """One view of one sample, every op after the crop: uint8 (H, W, 3) `img` -> float32 C-contiguous (H, W, 3)
    `out`, normalised. Colour jitter in the sample's order and grayscale (`_jitter_grayscale_float`), the blur
    (`_blur_one`, at most `max_radius` taps a side), solarize at `threshold`, the flip and (x - mean) / std (float32
    (3,) arrays) in one last pass: the batch stages' formulas in float32, never rounded. `params` (float32,
    VIEW_PARAMS) packed as `KERNEL_PARAMS`: jitter on (0/1), the op ids in order, brightness (a delta with the
    reference's maths), contrast, saturation factors, hue shift (turns), hue on (0/1), grayscale (0/1), the
    reference's (`deepmind`) maths (0/1), blur (0/1), sigma, solarize (0/1), flip (0/1)."""
    h, w = img.shape[0], img.shape[1]
    for y in range(h):
        for x in range(w):
            for c in range(3):
                out[y, x, c] = _F(img[y, x, c]) * _TO01
    _augment_float(out, params, max_radius, threshold, mean, std)


@numba.njit(nogil=True, cache=True)
def crop_augment_view_hwc(out, img, window, params, max_radius, threshold, mean, std):
    """`augment_view_hwc` from the whole decoded image: the view's crop window (int (4,): top, left, height, width)
    of uint8 (H, W, 3) `img` resized into float32 (S, S, 3) `out` by `pipeline.resample.resize_crop` (PIL's
    antialiased bicubic, torchvision's), then every op after the crop, in place."""
    resize_crop(out, img, window[0], window[1], window[2], window[3])
    _augment_float(out, params, max_radius, threshold, mean, std)


@numba.njit(nogil=True)
def _augment_float(out, params, max_radius, threshold, mean, std):
    # every op after the crop on a float32 [0, 1] (H, W, 3) image, in place (see `augment_view_hwc`)
    h, w = out.shape[0], out.shape[1]
    order = params[_P_ORDER:_P_ORDER + _P_WIDTH].astype(np.int64)
    _jitter_grayscale_float(out, params[_P_JITTER] != 0, order, params[_P_B], params[_P_C], params[_P_S],
                            params[_P_H], params[_P_HUE_ON] != 0, params[_P_GRAY] != 0, params[_P_REF] != 0)
    if params[_P_BLUR] != 0 and max_radius > 0:
        tmp = np.empty((h, (w + 2 * max_radius) * 3), dtype=np.float32)
        _blur_one(out, tmp, params[_P_SIGMA], max_radius)
    sol, flip = params[_P_SOL] != 0, params[_P_FLIP] != 0
    # solarize and normalise along whole rows (the per-element mean and std tiled over a row), then the flip
    m = w * 3
    mean_row, std_row = np.empty(m, dtype=np.float32), np.empty(m, dtype=np.float32)
    for k in range(m):
        mean_row[k], std_row[k] = mean[k % 3], std[k % 3]
    rows = out.reshape(h, m)
    line = np.empty(m, dtype=np.float32)
    for y in range(h):
        row = rows[y]
        if sol:
            for k in range(m):
                v = row[k]
                line[k] = ((_ONE - v if v >= threshold else v) - mean_row[k]) / std_row[k]
        else:
            for k in range(m):
                line[k] = (row[k] - mean_row[k]) / std_row[k]
        if flip:
            for x in range(w):
                for c in range(3):
                    row[3 * x + c] = line[3 * (w - 1 - x) + c]
        else:
            for k in range(m):
                row[k] = line[k]


# --- a batch of crops: the stages of this engine --------------------------------------------------------------------
# The spec's ops (after the crop) as this engine runs them, grouped by fused pass.
STAGES = (("jitter", "grayscale"), ("blur",), ("solarize", "flip", "normalise"))
# The kernel of each jitter op, per maths (`color_ops`); `_jitter_grayscale_one` dispatches to them by op id.
JITTER_KERNELS = {
    "deepmind": {"brightness": _add_brightness, "contrast": _channel_contrast, "saturation": _hsv_saturation,
                 "hue": _hue},
    "torchvision": {"brightness": _brightness, "contrast": _contrast, "saturation": _saturation, "hue": _hue},
}


@numba.njit(nogil=True, cache=True)
def _augment_samples(samples, src, out, params, max_radius, threshold, mean, std):
    for i in samples:
        augment_view_hwc(out[i], src[i], params[i], max_radius, threshold, mean, std)


def check_blur_radius(kernel_size: int, side: int) -> None:
    """Refuse a blur window whose radius reaches the image side: `_blur_one` reflects once at each border and does
    not check its reads (a config's `blur_kernel_frac <= 1` never gets there)."""
    if kernel_size // 2 >= side:
        raise ValueError(f"blur window of {kernel_size} taps for {side} px images: the radius must be below the side")


def pack_view_params(params: dict[str, torch.Tensor], spec: ViewSpec, color_ops: str, flip: bool) -> np.ndarray:
    """The draws of `BatchedViewAugment.sample_params` (on the CPU) as the kernel's float32 (N, VIEW_PARAMS) rows,
    `KERNEL_PARAMS`' layout; `flip=False`: no sample flips (the crop upstream did)."""
    n = len(params["jitter"])
    flags = {"hue_on": float(spec.hue > 0), "reference": float(color_ops == "deepmind")}
    packed = np.zeros((n, VIEW_PARAMS), dtype=np.float32)
    for name, width in KERNEL_PARAMS:
        if name in flags:
            packed[:, _AT[name]] = flags[name]
        elif name != "flip" or flip:
            packed[:, _AT[name]:_AT[name] + width] = params[name].numpy().reshape(n, width)
    return packed


def augment_crops(nchw: torch.Tensor, params: dict[str, torch.Tensor], spec: ViewSpec, color_ops: str, flip: bool,
                  kernel_size: int, mean: np.ndarray, std: np.ndarray,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The spec's ops after the crop on uint8 (N, 3, S, S) crops (any strides) with the draws of
    `BatchedViewAugment.sample_params`: each sample through `augment_view_hwc` (its own ops only, every op while the
    image sits in cache: `STAGES` are the passes inside it), the samples spread over torch's intra-op thread count.
    Returns float32 (N, 3, S, S), channels_last: a view of `out` (float32 C-contiguous (N, S, S, 3)) when given."""
    threads = torch.get_num_threads()   # the trainer sets it to the cores its loader workers leave free
    nhwc = nchw.permute(0, 2, 3, 1).contiguous()
    if len(params["jitter"]) != nhwc.shape[0]:   # the kernel does not check its reads
        raise ValueError(f"draws for {len(params['jitter'])} samples, {nhwc.shape[0]} crops")
    if out is None:
        out = torch.empty(nhwc.shape, dtype=torch.float32)
    elif out.shape != nhwc.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be float32 C-contiguous {tuple(nhwc.shape)}, got {out.dtype} {tuple(out.shape)}")
    check_blur_radius(kernel_size, min(nhwc.shape[1], nhwc.shape[2]))
    _over_samples(_augment_samples, nhwc.shape[0], threads, nhwc.numpy(), out.numpy(),
                  pack_view_params(params, spec, color_ops, flip), kernel_size // 2,
                  np.float32(spec.solarize_threshold), mean.astype(np.float32), std.astype(np.float32))
    return out.permute(0, 3, 1, 2)   # channels_last view of the NHWC buffer
