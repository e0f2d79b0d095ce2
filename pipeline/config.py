"""Typed configuration of the data pipeline: the augmentation spec of BYOL's two views and the loader settings.

The defaults are the paper's (Grill et al., 2020, Appendix B, Table 6): both views share the crop, flip, colour jitter
and grayscale distributions; they differ in blur (p 1.0 vs 0.1) and solarisation (p 0.0 vs 0.2). Every backend reads
the same `ViewSpec`, so the augmentation has one source of truth.
"""
from __future__ import annotations

from dataclasses import dataclass, field
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The maths of colour jitter (`AugmentConfig.color_ops`); the formulas are in `pipeline.device_augment`.
COLOR_OPS = ("deepmind", "torchvision")


@dataclass
class ViewSpec:
    """The distribution T (or T') of one augmented view. Every random choice is drawn per sample.

    Args:
        crop_scale: range of the crop's area as a fraction of the image area (random resized crop).
        crop_ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        flip_p: probability of a horizontal flip.
        jitter_p: probability of applying colour jitter (its four ops then run in a random order per sample).
        brightness, contrast, saturation: jitter strengths s; the draws' ranges depend on `AugmentConfig.color_ops`
            (`deepmind`: brightness delta in [-s, s], factors in [1 - s, 1 + s]; `torchvision`: factors in
            [max(0, 1 - s), 1 + s]).
        hue: hue jitter strength as a fraction of the hue circle, shift uniform in [-hue, hue] (0.1 = +-36 degrees).
        grayscale_p: probability of converting to grayscale (luma, replicated to three channels).
        blur_p: probability of a gaussian blur.
        blur_sigma: range of the blur's sigma in pixels, uniform.
        blur_kernel_frac: kernel size as a fraction of the output size (10 %: 23 taps at 224 px), made odd.
        solarize_p: probability of solarisation (x >= threshold -> 1 - x on [0, 1] pixels).
        solarize_threshold: the solarisation threshold on [0, 1] pixels.
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5


def _view2_default() -> ViewSpec:
    return ViewSpec(blur_p=0.1, solarize_p=0.2)


@dataclass
class AugmentConfig:
    """BYOL's pair of view distributions plus the normalisation both share.

    Args:
        color_ops: the maths of colour jitter, on every backend: `deepmind` (the paper's, DeepMind's BYOL reference:
            brightness adds a delta, contrast blends with each channel's mean, saturation scales HSV saturation,
            clipped after each op) or `torchvision` (`ColorJitter`'s: brightness multiplies, contrast and
            saturation blend with the grayscale image's mean and the grayscale image). Hue is the same HSV shift in
            both. See `pipeline.device_augment`.
    """

    view1: ViewSpec = field(default_factory=ViewSpec)
    view2: ViewSpec = field(default_factory=_view2_default)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color_ops: str = "deepmind"


@dataclass
class DaliConfig:
    """Settings of the DALI backend.

    Args:
        num_threads: CPU threads of the DALI pipeline.
        decoder: `mixed` (nvJPEG on the GPU; falls back to `cpu` with a warning when no GPU is present) or `cpu`.
        random_crop_decoder: decode each view's crop window separately (`decoders.image_slice`) instead of decoding
            once and cropping twice; measured no faster on CPUs (not yet measured with nvJPEG), so off.
        exact_hue: torchvision's hue (an exact HSV shift in DALI arithmetic) rather than DALI's `fn.hsv`, whose hue
            differs from torchvision's by more than the shift itself; ~40 % more CPU time with the graph ops (its GPU
            cost is not measured yet).
        cpu_kernels: where images are augmented on the CPU, run colour jitter and grayscale as one operator of
            per-pixel numba kernels (`pipeline.cpu_augment`, exact hue included) instead of DALI's per-op graph (the
            GPU's); the same draws, rounded once instead of after every op.
        prefetch_queue_depth: batches DALI prepares ahead.
        hw_decoder_load: share of JPEG decoding given to the hardware decoder (A100/H100), 0..1.
    """

    num_threads: int = 4
    decoder: str = "mixed"
    random_crop_decoder: bool = False
    exact_hue: bool = True
    cpu_kernels: bool = True
    prefetch_queue_depth: int = 2
    hw_decoder_load: float = 0.65


@dataclass
class FfcvConfig:
    """Settings of the FFCV backend.

    Args:
        order: `random` (per-epoch shuffle, supports `distributed`), `quasi_random` (page-wise, lower RAM) or `sequential`.
        os_cache: read the whole file through the OS page cache (True) or with FFCV's own process cache.
        batches_ahead: batches FFCV prepares ahead.
    """

    order: str = "random"
    os_cache: bool = True
    batches_ahead: int = 3


@dataclass
class DataConfig:
    """Where the images are and how they become two views on the device.

    Args:
        backend: one of `dali`, `ffcv`, `torch`, `synthetic`.
        path: an ImageFolder tree (`torch`, `dali`), a `.beton` file (`ffcv`), a shard folder with `manifest.json`
            (`dali`), or unused (`synthetic`).
        image_size: side of the square output views in pixels.
        num_workers: loader worker processes (`torch`, `ffcv`).
        synthetic_size: images per epoch of the `synthetic` backend.
        augment: the two view distributions.
        dali: DALI-specific settings.
        ffcv: FFCV-specific settings.
        max_bad_fraction: images that fail to decode are replaced and counted; above this share of an epoch the
            run stops with an error naming the files (the data is then more broken than a few bad JPEGs).
    """

    backend: str = "torch"
    path: str = ""
    image_size: int = 224
    num_workers: int = 2
    synthetic_size: int = 1024
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    dali: DaliConfig = field(default_factory=DaliConfig)
    ffcv: FfcvConfig = field(default_factory=FfcvConfig)
    max_bad_fraction: float = 0.01
