"""BYOL's view augmentation as a DALI graph: one function, called once per view with that view's `ViewSpec`.

Call these only inside a `@pipeline_def(enable_conditionals=True)` function: the per-sample probabilities are `if`
statements on per-sample coins, so an expensive op (blur) runs only on the samples whose coin says so.

Colour jitter follows `data.augment.color_ops` (the maths: `pipeline.device_augment`). With `deepmind` (the default,
the paper's reference), on uint8 pixels rounded after each op:
  - brightness: `fn.brightness_contrast(brightness_shift=delta)`, x + 255 delta, rounded and saturated to [0, 255];
  - contrast: `channel_contrast`, each channel blended with its own mean (`fn.reductions.mean` over H and W, kept on
    the device that computed it), then a rounding, saturating cast;
  - saturation: `hsv_saturation`, the HSV saturation scaled in closed form, V - (V - x) clip(f, 0, V / (V - min)),
    in DALI arithmetic (DALI's `fn.hsv` saturation is a blend with the luma in YIQ, torchvision's maths, not this);
  - hue: the same HSV shift as torchvision's (below);
the numpy transcription of the reference's formulas is matched within 1.5 grey levels (the tests). With
`torchvision`, against torchvision's functional ops on [0, 1] floats (the DALI ops work on uint8 and round after
each op, so results agree within 1.5 grey levels on photographs, most pixels exactly; the tests hold them to it):
  - brightness, saturation, grayscale: `fn.brightness_contrast`, `fn.hsv(saturation=...)` (a linear blend with the
    luma, which is torchvision's blend with the grayscale image), `fn.color_space_conversion` to GRAY and back.
  - contrast: a blend with the mean of the image's grayscale passed per sample as `contrast_center`. DALI's default
    centre is the fixed mid-grey (128), which is NOT torchvision's. DALI's luma weighs red 0.299, torchvision 0.2989.
  - hue: torchvision shifts H in HSV; `adjust_hue` does exactly that with DALI arithmetic, in many more operators
    than `fn.hsv(hue=...)`. The cheaper `fn.hsv` hue (`exact_hue=False`) rotates the chroma about the grey axis (a
    linear map in YIQ): on photographs, at torchvision's largest shift (0.1 of the circle = 36 degrees), its output is
    farther from torchvision's than the unshifted image is: it is a different augmentation, not an approximation.
  - blur: a separable gaussian with a per-sample sigma; torchvision's window (`blur_kernel_frac` of the size, made
    odd: 23 taps at 224 px) is cut to 2 ceil(4 sigma) + 1 taps when that is shorter (the cut taps weigh < 1e-4).
  - solarize: exact (`x >= ceil(255 t) -> 255 - x` on uint8).
  - crop: `random_crop_generator` draws the window as `RandomResizedCrop` does (area, log-uniform aspect, ten tries);
    when all ten fail (only images far outside the aspect range), DALI's fallback window (the largest one in the
    aspect range) sits at a random position where torchvision centres it. The window is resized with antialiased
    bicubic interpolation.
The flip is applied last, inside the normalising op: it commutes with every op in between (`augment_spec.ORDER_FREE`).
The op order, the draws (`draw_view`, the spec's table) and the jitter orders are `pipeline.augment_spec`'s;
`STAGES` is the order this graph runs the spec's ops in.

Where the images are on the CPU (`data.dali.cpu_kernels`, the default), every op after the crop runs instead as one
`fn.python_function` over `pipeline.cpu_augment.augment_view_hwc` (`CpuAugment`, `KERNEL_STAGES`): the same draws,
the same formulas (either maths) in float32, never rounded, instead of the graph's passes over uint8 images (the
exact hue alone is ~60 arithmetic operators over float images, and DALI's CPU blur costs ~10x the kernel's row
passes); `byol bench --what stages` measures both. The GPU keeps the graph ops.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Union

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import do_not_convert

from byolfast.pipeline.augment_spec import (BRIGHTNESS, CONTRAST, DRAWS, HUE, JITTER_OPS, JITTER_ORDERS,
                                            SATURATION, SLOTS_AFTER_HUE, SLOTS_BEFORE_HUE, blur_kernel_size,
                                            draw_range)
from byolfast.pipeline.config import ViewSpec
from byolfast.pipeline.cpu_augment import (KERNEL_PARAMS, augment_view_hwc, check_blur_radius,
                                           crop_augment_view_hwc)

# The spec's ops (after the crop) in the order this graph runs them, and in the order of the one CPU operator
# (`CpuAugment`) that replaces them where `cpu_threads` is set and the images are on the CPU.
STAGES = (("jitter", "grayscale"), ("blur",), ("solarize",), ("flip", "normalise"))
KERNEL_STAGES = (("jitter", "grayscale", "blur", "solarize", "flip", "normalise"),)

# The helpers marked `do_not_convert` hold no `if` on per-sample data: keeping them out of DALI's conditional
# (AutoGraph) rewriting shortens the pipeline's build, which the loader repeats every epoch; inside a branch their
# ops still see only its samples.

@do_not_convert
def crop_window(shapes: DataNode, spec: ViewSpec) -> tuple[DataNode, DataNode]:
    """Draw a random-resized-crop window per sample from the images' (H, W, C) shapes: (anchor, shape), both (y, x)."""
    return fn.random_crop_generator(shapes, random_area=list(spec.crop_scale),
                                    random_aspect_ratio=list(spec.crop_ratio))


@do_not_convert
def resize_window(images: DataNode, anchor: DataNode, shape: DataNode, size: int) -> DataNode:
    """Cut the window out of decoded images and resize it to `size` x `size` in one antialiased bicubic pass."""
    start = fn.cast(anchor, dtype=types.FLOAT)
    end = start + fn.cast(shape, dtype=types.FLOAT)
    return fn.resize(images, roi_start=start, roi_end=end, size=[size, size], interp_type=types.INTERP_CUBIC,
                     antialias=True)


@do_not_convert
def decode_window(jpegs: DataNode, anchor: DataNode, shape: DataNode, size: int, device: str,
                  hw_decoder_load: float) -> DataNode:
    """Decode only the window of each encoded image, then resize it to `size` x `size` (bicubic)."""
    kwargs = {"hw_decoder_load": hw_decoder_load} if device == "mixed" else {}
    crop = fn.decoders.image_slice(jpegs, anchor, shape, axes=[0, 1], device=device, output_type=types.RGB,
                                   **kwargs)
    return fn.resize(crop, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)


@do_not_convert
def _uniform(lo: float, hi: float) -> Union[DataNode, float]:
    """A per-sample uniform draw, or the plain number when the range is a single point."""
    return float(lo) if hi <= lo else fn.random.uniform(range=[lo, hi], dtype=types.FLOAT)


@do_not_convert
def gaussian_blur(images: DataNode, sigma: Union[DataNode, float], max_window: int) -> DataNode:
    """Gaussian blur with a per-sample window of 2 ceil(4 sigma) + 1 taps, at most `max_window`.

    torchvision always convolves with `max_window` taps; the taps beyond 4 sigma weigh under 1e-4 of the kernel,
    so the shorter window moves a pixel by under 0.1 grey level before rounding (at most 1 after it), and BYOL's
    sigma in [0.1, 2] needs at most 17 taps where torchvision convolves with 23 at 224 px.
    """
    if isinstance(sigma, DataNode):
        window = dmath.min(fn.cast(2 * dmath.ceil(4 * sigma) + 1, dtype=types.INT32), max_window)
    else:
        window = min(2 * math.ceil(4 * sigma) + 1, max_window)
    return fn.gaussian_blur(images, window_size=window, sigma=sigma)


@do_not_convert
def _coin(p: float) -> DataNode:
    return fn.random.coin_flip(probability=float(p), dtype=types.BOOL)


@do_not_convert
def adjust_contrast(images: DataNode, factor: Union[DataNode, float]) -> DataNode:
    """torchvision's adjust_contrast: blend with the mean of the image's grayscale (per sample).

    Written as arithmetic (one fused expression, then a rounding, saturating cast) so that the per-sample mean stays
    on the device that computed it: `fn.brightness_contrast` takes its centre as an argument input, which lives on
    the CPU, and would send the mean from the GPU to the host in every contrast op of every batch.
    """
    gray = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    gray_mean = fn.reductions.mean(gray, dtype=types.FLOAT)
    return fn.cast(images * factor + gray_mean * (1.0 - factor), dtype=types.UINT8)


@do_not_convert
def channel_contrast(images: DataNode, factor: Union[DataNode, float]) -> DataNode:
    """The reference's contrast: blend each channel with its own mean over the image (per sample), in arithmetic
    for the reason `adjust_contrast` gives."""
    mean = fn.reductions.mean(images, axes=[0, 1], dtype=types.FLOAT, keep_dims=True)   # (1, 1, C)
    return fn.cast(images * factor + mean * (1.0 - factor), dtype=types.UINT8)


@do_not_convert
def hsv_saturation(images: DataNode, factor: Union[DataNode, float]) -> DataNode:
    """The reference's saturation: HSV saturation S -> clip(S * f, 0, 1), hue and value kept, in closed form per
    pixel: out_c = V - (V - x_c) * clip(f, 0, V / (V - min)), V the channel maximum. Grey pixels stay as they are."""
    x = fn.cast(images, dtype=types.FLOAT)
    hi = fn.reductions.max(x, axes=[2], keep_dims=True)
    lo = fn.reductions.min(x, axes=[2], keep_dims=True)
    limit = hi / dmath.max(hi - lo, 1.0)  # pixels are integers: V - min is 0 (grey, any value works) or >= 1
    f = dmath.max(factor, 0.0) if isinstance(factor, DataNode) else max(float(factor), 0.0)
    return fn.cast(hi - (hi - x) * dmath.min(f, limit), dtype=types.UINT8)


@do_not_convert
def grayscale(images: DataNode) -> DataNode:
    """Luma replicated to three channels (torchvision's rgb_to_grayscale(num_output_channels=3))."""
    gray = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    return fn.color_space_conversion(gray, image_type=types.GRAY, output_type=types.RGB)


@do_not_convert
def solarize(images: DataNode, threshold: float) -> DataNode:
    """torchvision's solarize on uint8 pixels: x >= ceil(255 t) -> 255 - x (bit-exact)."""
    x = fn.cast(images, dtype=types.INT16)
    above = x >= math.ceil(255 * threshold)
    return fn.cast(x + above * (255 - 2 * x), dtype=types.UINT8)


@do_not_convert
def adjust_hue(images: DataNode, shift: Union[DataNode, float]) -> DataNode:
    """torchvision's adjust_hue: shift H in HSV by `shift` (a fraction of the circle), keeping S and V.

    Per pixel, with M = max, m = min of (r, g, b) and H in sextants: out_c = M - (M - m) * clamp(min(k, 4 - k), 0, 1)
    with k = (n_c + H + 6 shift) mod 6, n = (5, 3, 1) for (r, g, b): the closed form of hsv_to_rgb(h + shift, s, v).
    """
    x = fn.cast(images, dtype=types.FLOAT)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    hi = dmath.max(dmath.max(r, g), b)
    lo = dmath.min(dmath.min(r, g), b)
    chroma = hi - lo
    inv = 1.0 / dmath.max(chroma, 1.0)  # pixels are integers: chroma is 0 (grey, any hue) or >= 1
    r_max = hi == r
    g_max = (hi == g) & (hi != r)
    b_max = (hi != g) & (hi != r)
    sextant = (r_max * (g - b) + g_max * (b - r + 2.0 * chroma) + b_max * (r - g + 4.0 * chroma)) * inv + 6.0 * shift
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = sextant + n
        k = k - 6.0 * dmath.floor(k * (1.0 / 6.0))
        channels.append(hi - chroma * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0))
    return fn.cast(fn.stack(*channels, axis=2, axis_name="C"), dtype=types.UINT8)


@do_not_convert
def shift_brightness(images: DataNode, delta: Union[DataNode, float]) -> DataNode:
    """The reference's brightness: x + delta (255 delta on uint8), rounded and saturated."""
    return fn.brightness_contrast(images, brightness_shift=delta)


@do_not_convert
def scale_brightness(images: DataNode, factor: Union[DataNode, float]) -> DataNode:
    """torchvision's adjust_brightness: x * factor, rounded and saturated."""
    return fn.brightness_contrast(images, brightness=factor)


@do_not_convert
def blend_saturation(images: DataNode, factor: Union[DataNode, float]) -> DataNode:
    """torchvision's adjust_saturation: `fn.hsv`'s saturation, a linear blend with the luma."""
    return fn.hsv(images, saturation=factor)


# The graph op of each jitter op, per maths (`color_ops`).
JITTER_FUNCTIONS = {
    "deepmind": {"brightness": shift_brightness, "contrast": channel_contrast, "saturation": hsv_saturation,
                 "hue": adjust_hue},
    "torchvision": {"brightness": scale_brightness, "contrast": adjust_contrast, "saturation": blend_saturation,
                    "hue": adjust_hue},
}


@do_not_convert
def _jitter_op(images: DataNode, op: int, factors: dict[str, DataNode], exact_hue: bool = True,
               color_ops: str = "deepmind") -> DataNode:
    """One jitter op (an id of `JITTER_OPS`) with the maths of `color_ops`; an op of strength 0 is absent from
    `factors`. `exact_hue=False`: DALI's chroma rotation instead of the HSV hue shift."""
    name = JITTER_OPS[op]
    if name not in factors:
        return images
    if op == HUE and not exact_hue:
        return fn.hsv(images, hue=360.0 * factors[name])  # DALI's hue is in degrees
    return JITTER_FUNCTIONS[color_ops][name](images, factors[name])


def _jitter_slot(images: DataNode, op: DataNode, factors: dict[str, DataNode], color_ops: str) -> DataNode:
    """Brightness, contrast or saturation as the per-sample `op` says (-1: nothing)."""
    if op == BRIGHTNESS:
        images = _jitter_op(images, BRIGHTNESS, factors, color_ops=color_ops)
    elif op == CONTRAST:
        images = _jitter_op(images, CONTRAST, factors, color_ops=color_ops)
    elif op == SATURATION:
        images = _jitter_op(images, SATURATION, factors, color_ops=color_ops)
    return images


def color_jitter(images: DataNode, order: DataNode, factors: dict[str, DataNode], exact_hue: bool = True,
                 color_ops: str = "deepmind") -> DataNode:
    """Brightness, contrast, saturation and hue with the maths of `color_ops`, in the per-sample order
    `JITTER_ORDERS[order]`.

    The hue (the costly op) has one instance: the other three run in the spec's slots before it and after it
    (`SLOTS_BEFORE_HUE`, `SLOTS_AFTER_HUE`), each slot's op looked up from the sample's order (a static graph of 4
    slots x 4 ops would hold four hues).
    """
    keys = list(range(len(JITTER_ORDERS)))
    for table in (SLOTS_BEFORE_HUE, SLOTS_AFTER_HUE):
        if table is SLOTS_AFTER_HUE:
            images = _jitter_op(images, HUE, factors, exact_hue, color_ops)
        for j in range(3):
            op = fn.lookup_table(order, keys=keys, values=[row[j] for row in table], dtype=types.INT32)
            images = _jitter_slot(images, op, factors, color_ops)
    return images


class CpuAugment:
    """`fn.python_function` body: every op after the crop, for a batch of uint8 HWC images on the CPU, each sample
    through `pipeline.cpu_augment.augment_view_hwc` (colour jitter, grayscale, blur, solarize, flip and normalise in
    float32, never rounded, each pixel pass over one image while it sits in cache), the samples spread over
    `threads` threads (the kernel releases the GIL). Returns float32 HWC images.

    On the CPU this replaces the graph's per-op passes over uint8 images (the exact hue alone is ~60 DALI arithmetic
    ops over float images; DALI's CPU blur convolves several times slower than the kernel's row passes); on the GPU
    the graph ops stay.
    """

    def __init__(self, threads: int, kernel_size: int, threshold: float, mean, std):
        self.threads = max(1, threads)
        self.max_radius = kernel_size // 2
        self.threshold = np.float32(threshold)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self._buffers: list[np.ndarray] = []

    def _outputs(self, shapes: list) -> list:
        """float32 arrays of `shapes`, the last call's reused where their shapes match: DALI copies a python
        function's outputs before the next call (`tests/test_dali_loader.py` checks it), and fresh ones would cost a
        page fault per 4 kB (~0.2 ms a 224 px view)."""
        for i, shape in enumerate(shapes):
            if i == len(self._buffers):
                self._buffers.append(np.empty(shape, dtype=np.float32))
            elif self._buffers[i].shape != tuple(shape):
                self._buffers[i] = np.empty(shape, dtype=np.float32)
        return self._buffers[:len(shapes)]

    def __call__(self, images: list, params: list) -> list:
        outs = self._outputs([img.shape for img in images])
        run = lambda out, img, p: augment_view_hwc(out, img, p, self.max_radius, self.threshold, self.mean,  # noqa
                                                   self.std)
        with ThreadPoolExecutor(min(self.threads, len(outs))) as pool:
            list(pool.map(run, outs, images, params))
        return outs


class CpuCropAugment(CpuAugment):
    """`CpuAugment` that also does the crop: from whole decoded images and each sample's window (int32 (4,): top,
    left, height, width), `pipeline.cpu_augment.crop_augment_view_hwc` resizes the window to `size` x `size`
    (PIL's antialiased bicubic in numba, ~0.45 ms a view at 224 px where DALI's CPU `fn.resize` takes ~2.2) and runs
    every op after it."""

    def __init__(self, threads: int, size: int, kernel_size: int, threshold: float, mean, std):
        super().__init__(threads, kernel_size, threshold, mean, std)
        self.size = size

    def __call__(self, images: list, windows: list, params: list) -> list:
        # a window outside its image: `resize_crop` raises, before it reads
        outs = self._outputs([(self.size, self.size, 3)] * len(images))
        run = lambda out, img, win, p: crop_augment_view_hwc(out, img, win.astype(np.int64), p,  # noqa
                                                             self.max_radius, self.threshold, self.mean, self.std)
        with ThreadPoolExecutor(min(self.threads, len(outs))) as pool:
            list(pool.map(run, outs, images, windows, params))
        return outs


@do_not_convert
def _as_node(value: Union[DataNode, float], like: DataNode) -> DataNode:
    """A per-sample float scalar: `value` itself, or the constant broadcast over the batch of `like`."""
    if isinstance(value, DataNode):
        return fn.cast(value, dtype=types.FLOAT)
    return fn.cast(like, dtype=types.FLOAT) * 0.0 + float(value)


@do_not_convert
def cpu_augment_view(images: DataNode, spec: ViewSpec, drawn: dict[str, Union[DataNode, float]], image_size: int,
                     mean: tuple[float, float, float], std: tuple[float, float, float], threads: int,
                     color_ops: str = "deepmind", window: Optional[tuple[DataNode, DataNode]] = None) -> DataNode:
    """Every op after the crop (the draws of `draw_view`) on CPU images in one `CpuAugment` operator: normalised
    float32 HWC images. With `window` (the (anchor, shape) of `crop_window`), `images` are the whole decoded images
    and the operator (`CpuCropAugment`) cuts and resizes each window first."""
    order = drawn["order"]
    keys = list(range(len(JITTER_ORDERS)))
    ops = [fn.lookup_table(order, keys=keys, values=[o[k] for o in JITTER_ORDERS], dtype=types.FLOAT)
           for k in range(4)]
    reference = color_ops == "deepmind"
    identities = {"brightness": 0.0 if reference else 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
    # The packed vector of `cpu_augment.KERNEL_PARAMS`, built in its order (the graph's operators, and so their seeds,
    # keep the order they are built in).
    scalars = {"jitter": drawn["jitter"], **{name: drawn.get(name, identities[name]) for name in JITTER_OPS},
               "hue_on": float(spec.hue > 0), "grayscale": drawn["grayscale"], "reference": float(reference),
               "blur": drawn["blur"], "sigma": drawn["sigma"], "solarize": drawn["solarize"], "flip": drawn["flip"]}
    groups = [ops if name == "order" else [_as_node(scalars[name], order)] for name, _ in KERNEL_PARAMS]
    params = fn.stack(*[node for group in groups for node in group])
    kernel_size = blur_kernel_size(image_size, spec.blur_kernel_frac)
    check_blur_radius(kernel_size, image_size)
    if window is None:
        body = CpuAugment(threads, kernel_size, spec.solarize_threshold, mean, std)
        return fn.python_function(images, params, function=body, batch_processing=True, output_layouts="HWC")
    body = CpuCropAugment(threads, image_size, kernel_size, spec.solarize_threshold, mean, std)
    anchor, shape = window
    windows = fn.cat(fn.cast(anchor, dtype=types.INT32), fn.cast(shape, dtype=types.INT32))
    return fn.python_function(images, windows, params, function=body, batch_processing=True, output_layouts="HWC")


@do_not_convert
def draw_view(spec: ViewSpec, color_ops: str = "deepmind") -> dict[str, Union[DataNode, float]]:
    """Every per-sample random draw of one view but the crop's, as the spec's table (`augment_spec.DRAWS`) lists
    them, in its order: coins as BOOL (the flip as INT32, the type of `mirror`), the jitter order as an INT32 index
    into `JITTER_ORDERS`, uniform draws as FLOAT (a plain number where the range is one point). A jitter op of
    strength 0 is not drawn (absent)."""
    drawn: dict[str, Union[DataNode, float]] = {}
    for d in DRAWS:
        if d.kind == "coin":
            p = float(getattr(spec, d.param))
            dtype = types.INT32 if d.name == "flip" else types.BOOL
            drawn[d.name] = fn.random.coin_flip(probability=p, dtype=dtype)
        elif d.kind == "order":
            drawn[d.name] = fn.random.uniform(values=list(range(len(JITTER_ORDERS))), dtype=types.INT32)
        elif d.kind == "uniform" and (d.name not in JITTER_OPS or getattr(spec, d.param) > 0):
            drawn[d.name] = _uniform(*draw_range(d, spec, color_ops))   # the hue shift a fraction of the circle
    return drawn


def apply_view(images: DataNode, spec: ViewSpec, drawn: dict[str, Union[DataNode, float]], image_size: int,
               mean: tuple[float, float, float], std: tuple[float, float, float],
               dtype: types.DALIDataType = types.FLOAT, exact_hue: bool = True, cpu_threads: int = 0,
               color_ops: str = "deepmind", window: Optional[tuple[DataNode, DataNode]] = None) -> DataNode:
    """`STAGES` on cropped uint8 HWC images with the draws of `draw_view` (or any nodes of the same types, e.g. from
    an external source): see `augment_view` for the arguments."""
    if window is not None and not (cpu_threads > 0 and images.device == "cpu"):
        raise ValueError("a crop window is only taken by the CPU operator (cpu_threads > 0, images on the CPU)")
    if cpu_threads > 0 and images.device == "cpu":
        out = cpu_augment_view(images, spec, drawn, image_size, mean, std, cpu_threads, color_ops, window)
        return out if dtype == types.FLOAT else fn.cast(out, dtype=dtype)
    flip, jitter, order, gray = drawn["flip"], drawn["jitter"], drawn["order"], drawn["grayscale"]
    blur, sigma, sol = drawn["blur"], drawn["sigma"], drawn["solarize"]
    factors = {name: drawn[name] for name in JITTER_OPS if name in drawn}
    if spec.jitter_p > 0:
        if jitter:
            images = color_jitter(images, order, factors, exact_hue, color_ops)
    if spec.grayscale_p > 0:
        if gray:
            images = grayscale(images)
    window = blur_kernel_size(image_size, spec.blur_kernel_frac)
    if spec.blur_p >= 1:  # no split/merge when every sample is blurred (view 1)
        images = gaussian_blur(images, sigma, window)
    elif spec.blur_p > 0:
        if blur:
            images = gaussian_blur(images, sigma, window)
    if spec.solarize_p > 0:
        if sol:
            images = solarize(images, spec.solarize_threshold)
    return fn.crop_mirror_normalize(images, mirror=flip, dtype=dtype, output_layout="HWC",
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])


def augment_view(images: DataNode, spec: ViewSpec, image_size: int, mean: tuple[float, float, float],
                 std: tuple[float, float, float], dtype: types.DALIDataType = types.FLOAT,
                 draws: Optional[dict[str, DataNode]] = None, exact_hue: bool = True,
                 cpu_threads: int = 0, color_ops: str = "deepmind",
                 window: Optional[tuple[DataNode, DataNode]] = None) -> DataNode:
    """Draw (`draw_view`), then flip, colour jitter, grayscale, blur, solarise and normalise cropped uint8 HWC images
    (one view, `apply_view`).

    Args:
        images: uint8 HWC images already cropped and resized to `image_size` (or, with `window`, whole images).
        spec: the view's distribution.
        image_size: side of the images (sets the blur window).
        mean, std: normalisation on [0, 1] pixels.
        dtype: output dtype (FLOAT or FLOAT16).
        draws: if given, filled with every per-sample random draw, by its DALI name (`augment_spec.Draw.dali_name`;
            for tests and debugging).
        exact_hue: torchvision's HSV hue shift (True) or DALI's faster chroma rotation (`fn.hsv`, False); only for
            the graph ops (the CPU kernel's hue is always torchvision's).
        cpu_threads: if > 0 and the images are on the CPU, every op runs in one `CpuAugment` operator on this many
            threads instead of the graph ops (the same draws).
        color_ops: the maths of colour jitter, `deepmind` (the paper's) or `torchvision`; the brightness draw is a
            delta for `deepmind`, a factor for `torchvision` (`jitter_ranges`).
        window: each sample's crop window (anchor, shape) from `crop_window`, cut and resized inside the CPU
            operator (`CpuCropAugment`; only with `cpu_threads` and CPU images).

    Returns:
        Normalised float HWC images (a channels-last NCHW view on the torch side without a copy).
    """
    drawn = draw_view(spec, color_ops)
    out = apply_view(images, spec, drawn, image_size, mean, std, dtype, exact_hue, cpu_threads, color_ops, window)
    if draws is not None:
        draws.update((d.dali_name, drawn[d.name]) for d in DRAWS if isinstance(drawn.get(d.name), DataNode))
    return out
