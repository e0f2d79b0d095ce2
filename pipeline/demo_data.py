"""The embedded default data: real images that installed packages ship, written as ImageFolder trees of JPEGs.

- `digits`: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), upscaled with bicubic interpolation to `size`
  px RGB JPEGs, split into `train/` and `val/` (stratified, fixed seed) — a labelled set for pretraining and kNN.
  With `style="color"` (the demo's default) each digit is drawn in a random ink colour on a random paper colour, at a
  random scale and position: the nuisance factors that BYOL's augmentations teach invariance to, and that dominate
  a randomly initialised network's features.
- `photos`: scikit-image's sample photographs (astronaut, coffee, chelsea, ...) as full-size RGB JPEGs, one class
  folder each — realistic JPEGs for loader benchmarks and conversion tests.
Nothing is downloaded.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "camera",
          "coins", "moon", "page", "text", "brick", "grass", "gravel", "retina", "cat", "colorwheel", "logo")


def _write_jpeg(img: Image.Image, path: Path, quality: int = 95) -> None:
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, path)


def _colour_digit(gray: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """A digit (8x8, 0..255) in random ink on random paper, scaled to 60-100 % of `size` at a random position."""
    side = int(round(size * rng.uniform(0.6, 1.0)))
    alpha = np.asarray(Image.fromarray(gray, mode="L").resize((side, side), Image.BICUBIC), dtype=np.float32) / 255
    while True:
        ink, paper = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        luma = np.array([0.299, 0.587, 0.114])
        if abs(float(ink @ luma - paper @ luma)) > 60:   # keep the digit legible
            break
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = paper
    y, x = rng.integers(0, size - side + 1, 2)
    a = alpha[..., None]
    canvas[y:y + side, x:x + side] = canvas[y:y + side, x:x + side] * (1 - a) + ink * a
    return Image.fromarray(canvas.clip(0, 255).astype(np.uint8))


def build_digits(out: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0,
                 style: str = "plain") -> Path:
    """Write the digits as `out/train/<digit>/*.jpg` and `out/val/<digit>/*.jpg`; skipped when already complete.

    Args:
        style: `plain` (white on black, upscaled) or `color` (random ink/paper colours, scale and position).
    """
    if style not in ("plain", "color"):
        raise ValueError(f"style must be 'plain' or 'color', got {style!r}")
    from sklearn.datasets import load_digits

    out = Path(out)
    done = out / ".complete"
    if done.is_file():
        return out
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    rng = np.random.default_rng(seed)
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        idx = idx[rng.permutation(len(idx))]
        n_val = round(len(idx) * val_fraction)
        for split, chosen in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                if style == "color":
                    img = _colour_digit(images[i], size, np.random.default_rng([seed, int(i)]))
                else:
                    img = Image.fromarray(images[i], mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
                _write_jpeg(img, folder / f"{i:04d}.jpg")
    done.write_text(f"{len(images)} images, {size} px, {style}\n")
    log.info("wrote %d digit images to %s", len(images), out)
    return out


def build_photos(out: str | Path) -> Path:
    """Write scikit-image's sample photographs as `out/<name>/<name>.jpg` (full size, RGB)."""
    import skimage.data

    out = Path(out)
    done = out / ".complete"
    if done.is_file():
        return out
    written = 0
    for name in PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            arr = loader()
        except (OSError, ValueError) as err:   # an image that needs a download in this skimage version
            log.info("skipping skimage.data.%s: %s", name, err)
            continue
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            arr = (255 * (arr - arr.min()) / max(1e-9, float(arr.max() - arr.min()))).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        img = Image.fromarray(arr).convert("RGB")
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        _write_jpeg(img, folder / f"{name}.jpg")
        written += 1
    done.write_text(f"{written} photographs\n")
    return out


def build_demo_data(root: str | Path = "data/demo", size: int = 32, style: str = "color") -> dict[str, Path]:
    """Both embedded sets under `root`; returns their paths."""
    root = Path(root)
    return {"digits": build_digits(root / f"digits{size}-{style}", size=size, style=style),
            "photos": build_photos(root / "photos")}
