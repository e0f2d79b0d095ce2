"""Typed configuration of the data pipeline: the augmentation spec of BYOL's two views and the loader settings.

The defaults are the paper's (Grill et al., 2020, Appendix B, Table 6): both views share the crop, flip, colour jitter
and grayscale distributions; they differ in blur (p 1.0 vs 0.1) and solarisation (p 0.0 vs 0.2). Every backend reads
the same `ViewSpec`, so the augmentation has one source of truth.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Each backend's own section (`data.<backend name>`) is declared in its package; DataConfig holds one field per
# backend that has settings.
from byolfast.pipeline.backends.dali.settings import DaliConfig
from byolfast.pipeline.backends.ffcv.settings import FfcvConfig

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
class DataConfig:
    """Where the images are and how they become two views on the device.

    Args:
        backend: the name of a registered backend (`pipeline.registry.BACKENDS`: `dali`, `ffcv`, `torch`,
            `synthetic`).
        path: what the backend reads: an ImageFolder tree (`torch`, `dali`), a `.beton` file (`ffcv`), a shard folder
            with `manifest.json` (`dali`), or nothing (`synthetic`).
        image_size: side of the square output views in pixels.
        num_workers: loader worker processes (`torch`, `ffcv`).
        synthetic_size: images per epoch of the `synthetic` backend.
        augment: the two view distributions.
        dali: DALI-specific settings (`pipeline.backends.dali.settings`).
        ffcv: FFCV-specific settings (`pipeline.backends.ffcv.settings`).
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
