"""What every augmentation engine shares (the batched torch ops, the numba kernels, the DALI graph): the luma
weights, the jitter ops' numbering, the range each jitter draw is taken from, and the blur kernel's size rule.

An engine implements the ops; it takes these from here, so two engines cannot disagree on them.
"""
from __future__ import annotations

from byolfast.pipeline.config import COLOR_OPS, ViewSpec

# torchvision's luma weights (ITU-R 601-2, as in PIL's "L" conversion).
LUMA = (0.2989, 0.587, 0.114)
# Jitter op ids, the numbering of torchvision's ColorJitter (`fn_idx`).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


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


def blur_kernel_size(image_size: int, kernel_frac: float) -> int:
    """Taps of the blur kernel: `kernel_frac` of the output size, rounded down, made odd (23 at 224 px, as SimCLR)."""
    k = max(1, int(image_size * kernel_frac))
    return k if k % 2 == 1 else k + 1
