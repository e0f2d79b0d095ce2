"""BYOL's view augmentation, stated once: the order of the ops, the table of per-sample random draws, the orders of
the colour-jitter ops, the luma weights and the blur kernel's size rule.

Every engine implements the ops named here and takes the order and the draws' layout from this module: the batched
torch ops (`pipeline.device_augment`), the per-pixel numba kernels (`pipeline.cpu_augment`), the DALI graph
(`pipeline.dali_augment`, `pipeline.backends.dali.loader`) and the torchvision pipeline of
`pipeline.backends.torch.loader`.
The formulas of each op (two maths of colour jitter, `AugmentConfig.color_ops`) are described in
`pipeline.device_augment`. `tests/test_augment_spec.py` runs every op of every engine against this module.

The ops of one view, in order (`OPS`):
  crop       random resized crop (area in `crop_scale`, log-uniform aspect in `crop_ratio`), resized to the output
             size; the loaders do it before the colour engines see the image;
  flip       horizontal flip with probability `flip_p`;
  jitter     with probability `jitter_p`: brightness, contrast, saturation and hue (`JITTER_OPS`), in an order drawn
             uniformly per sample from `JITTER_ORDERS`, each from its range (`jitter_ranges`); an op of strength 0 is
             skipped;
  grayscale  with probability `grayscale_p`: the luma (`LUMA`) on all three channels;
  blur       with probability `blur_p`: a gaussian of `blur_kernel_size` taps, sigma uniform in `blur_sigma`, cut at
             `BLUR_TRUNCATE` sigmas (`blur_radius`; the cut taps weigh under 1e-4 of the kernel, see there);
  solarize   with probability `solarize_p`: x >= `solarize_threshold` -> 1 - x;
  normalise  (x - mean) / std per channel.
The flip commutes with every op between it and the normalisation (they are per pixel, or per image and symmetric
under a mirror: the means, the blur's symmetric kernel and reflect padding), so an engine may fuse it there
(`ORDER_FREE`); every other op keeps its place.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

from byolfast.pipeline.config import COLOR_OPS, ViewSpec

OPS = ("crop", "flip", "jitter", "grayscale", "blur", "solarize", "normalise")
# Ops an engine may move later (up to the normalisation), see the module's doc.
ORDER_FREE = frozenset({"flip"})

# torchvision's luma weights (ITU-R 601-2, as in PIL's "L" conversion).
LUMA = (0.2989, 0.587, 0.114)
# The blur kernel ends at this many sigmas (scipy.ndimage.gaussian_filter's default `truncate`), when that is shorter
# than `blur_kernel_size`: see `blur_radius`.
BLUR_TRUNCATE = 4.0
# The jitter ops; their ids (positions) are the numbering of torchvision's ColorJitter (`fn_idx`).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
# The 24 orders of the four jitter ops; DALI draws an index into this table, the batched engines a permutation.
JITTER_ORDERS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(4)))


@dataclass(frozen=True)
class Draw:
    """One per-sample random draw of a view.

    Args:
        name: its key in the engines' draw dicts (`BatchedViewAugment.sample_params`, `dali_augment.draw_view`).
        op: the op of `OPS` it parameterises.
        kind: `coin` (True with probability `ViewSpec.<param>`), `uniform` (a float in `draw_range`), `order` (a
            uniform random jitter order: an argsort of `width` uniform columns in the batched engines, an index
            into `JITTER_ORDERS` in DALI), `crop` (a crop window, drawn by the crop step).
        param: the `ViewSpec` field that sets its distribution (none for `order` and `crop`).
        column: its first column in the batched engines' one uniform draw per sample, (n, `NUM_COLUMNS`); None for
            the draws the crop step makes.
        width: columns it takes.
        dali_name: the name of DALI's debug output of it (`backends.dali.loader.DEBUG_DRAWS`), where that differs.
    """

    name: str
    op: str
    kind: str
    param: Optional[str]
    column: Optional[int]
    width: int = 1
    dali_name: str = ""

    def __post_init__(self):
        if not self.dali_name:
            object.__setattr__(self, "dali_name", self.name)


# Listed in the order the DALI graph builds them and lists them in its debug outputs (DALI's automatic seeds depend on
# the graph's operator order); the columns fix what a seed means for the batched engines. Changing either changes the
# views a seed gives.
DRAWS = (
    Draw("flip", "flip", "coin", "flip_p", 0),
    Draw("jitter", "jitter", "coin", "jitter_p", 1),
    Draw("order", "jitter", "order", None, 6, width=4),
    Draw("brightness", "jitter", "uniform", "brightness", 2),
    Draw("contrast", "jitter", "uniform", "contrast", 3),
    Draw("saturation", "jitter", "uniform", "saturation", 4),
    Draw("hue", "jitter", "uniform", "hue", 5),
    Draw("grayscale", "grayscale", "coin", "grayscale_p", 10, dali_name="gray"),
    Draw("blur", "blur", "coin", "blur_p", 11),
    Draw("sigma", "blur", "uniform", "blur_sigma", 12),
    Draw("solarize", "solarize", "coin", "solarize_p", 13),
    Draw("crop_anchor", "crop", "crop", None, None),
    Draw("crop_shape", "crop", "crop", None, None),
)
DRAW = {d.name: d for d in DRAWS}
NUM_COLUMNS = max(d.column + d.width for d in DRAWS if d.column is not None)


def jitter_ranges(spec: ViewSpec, color_ops: str) -> dict[str, tuple[float, float]]:
    """The uniform range of each jitter draw: brightness (a delta for `deepmind`, a factor for `torchvision`),
    contrast and saturation factors, hue shift in turns. Every engine draws from these ranges."""
    if color_ops not in COLOR_OPS:
        raise ValueError(f"data.augment.color_ops={color_ops!r}: expected one of {', '.join(COLOR_OPS)}")
    b, c, s, h = spec.brightness, spec.contrast, spec.saturation, spec.hue
    if color_ops == "deepmind":
        return {"brightness": (-b, b), "contrast": (1.0 - c, 1.0 + c), "saturation": (1.0 - s, 1.0 + s),
                "hue": (-h, h)}
    return {"brightness": (max(0.0, 1.0 - b), 1.0 + b), "contrast": (max(0.0, 1.0 - c), 1.0 + c),
            "saturation": (max(0.0, 1.0 - s), 1.0 + s), "hue": (-h, h)}


def draw_range(draw: Draw, spec: ViewSpec, color_ops: str) -> tuple[float, float]:
    """The range of a `uniform` draw: `jitter_ranges` for the jitter ops, else the (lo, hi) pair of its field."""
    if draw.kind != "uniform":
        raise ValueError(f"draw {draw.name!r} is a {draw.kind}, not a uniform draw")
    if draw.name in JITTER_OPS:
        return jitter_ranges(spec, color_ops)[draw.name]
    lo, hi = getattr(spec, draw.param)
    return float(lo), float(hi)


def _split_at_hue(order: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    k = list(order).index(HUE)
    rest = [op for op in order if op != HUE]
    return (tuple(rest[j] if j < k else -1 for j in range(3)), tuple(rest[j] if j >= k else -1 for j in range(3)))


# The hue (an HSV round trip) is the costly jitter op: the graph engines run it once per batch and the three linear
# ops in three slots before it and three after. Per order index and slot j: the j-th non-hue op of the order if it
# runs before the hue (else -1), and if it runs after.
SLOTS_BEFORE_HUE = tuple(_split_at_hue(o)[0] for o in JITTER_ORDERS)
SLOTS_AFTER_HUE = tuple(_split_at_hue(o)[1] for o in JITTER_ORDERS)


def order_index(order: Sequence[int]) -> int:
    """The index of a jitter order (a permutation of the op ids) in `JITTER_ORDERS`."""
    return JITTER_ORDERS.index(tuple(int(op) for op in order))


def blur_kernel_size(image_size: int, kernel_frac: float) -> int:
    """Taps of the blur kernel: `kernel_frac` of the output size, rounded down, made odd (23 at 224 px, as SimCLR)."""
    k = max(1, int(image_size * kernel_frac))
    return k if k % 2 == 1 else k + 1


def blur_radius(sigma: float, kernel_size: int) -> int:
    """Taps on each side of the centre of the blur kernel of `sigma`: those of `kernel_size`, cut at `BLUR_TRUNCATE`
    sigmas, min(kernel_size // 2, ceil(4 sigma)), computed in float32 as every engine does.

    torchvision (and the paper's reference) always convolve with `kernel_size` taps. The taps beyond 4 sigma weigh
    under exp(-8) = 3.4e-4 of the centre tap each and under 1e-4 of the kernel together, so the shorter kernel moves a
    pixel by under 0.03 grey level; at 224 px it is 3-17 taps where the full one is 23 (BYOL's sigma in [0.1, 2]),
    the blur's cost in the CPU kernels, DALI's graph and the torch backend's `SpecGaussianBlur`. The batched torch
    module zeroes the same taps, so every engine computes one kernel.
    """
    import numpy as np

    return int(min(kernel_size // 2, np.ceil(np.float32(BLUR_TRUNCATE) * np.float32(sigma))))


def check_stages(stages: Sequence[Sequence[str]], ops: Sequence[str] = OPS) -> None:
    """Check an engine's stages (the spec's op names in the order it runs them, grouped by fused pass) against
    `ops`: each op exactly once, in the spec's order, except that an `ORDER_FREE` op may come later.

    Raises:
        ValueError: naming the missing, unknown, repeated or misplaced ops.
    """
    flat = [name for stage in stages for name in stage]
    missing, unknown = set(ops) - set(flat), set(flat) - set(ops)
    repeated = {name for name in flat if flat.count(name) > 1}
    if missing or unknown or repeated:
        raise ValueError(f"stages {list(stages)}: missing {sorted(missing)}, unknown {sorted(unknown)}, "
                         f"repeated {sorted(repeated)} (spec: {list(ops)})")
    fixed = [name for name in flat if name not in ORDER_FREE]
    if fixed != [name for name in ops if name not in ORDER_FREE]:
        raise ValueError(f"stages {list(stages)} run the ops out of the spec's order {list(ops)}")
    for name in ORDER_FREE & set(ops):
        at = flat.index(name)
        early = [op for op in ops[:ops.index(name)] if op not in flat[:at]]
        if early or ("normalise" in flat and at > flat.index("normalise")):
            raise ValueError(f"stages {list(stages)}: {name!r} runs before {early} or after the normalisation")
