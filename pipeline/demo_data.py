"""The embedded default data: real images that installed packages ship, written as ImageFolder trees of JPEGs.

- `scenes` (the demo's data): 22 photographs that scikit-image and scikit-learn ship (an astronaut, a cat, coffee,
  coins, bricks, grass, a galaxy field, a retina, ...), cut into small square patches at random places and sizes; the
  class is the photograph. Training patches come from the top 65 % of each photograph and held-out patches from the
  bottom 30 %, so a held-out patch shows a part of the scene no training patch shows: recognising it takes what the
  scene's parts have in common (materials, textures, shapes), the kind of content two random crops of one image share.
- `digits`: scikit-learn's 1,797 handwritten digits (8x8, 10 classes), upscaled with bicubic interpolation to `size`
  px RGB JPEGs, split into `train/` and `val/` (stratified, fixed seed). `style="color"` draws each digit in random
  ink on random paper at a random scale and position.
- `photos`: scikit-image's sample photographs as full-size RGB JPEGs, one class folder each: realistic JPEGs for
  loader benchmarks and conversion tests.
Nothing is downloaded.
"""
from __future__ import annotations

import logging
import os
import shutil
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


# (name, loader): the scenes, in class order. Loaders return uint8 (H, W[, 3]) arrays, bool for the horse silhouette.
SCENES = ("astronaut", "brick", "camera", "cat", "coffee", "coins", "grass", "gravel", "horse", "hubble_deep_field",
          "immunohistochemistry", "moon", "motorcycle", "page", "retina", "rocket", "text", "cell", "microaneurysms",
          "clock", "china", "flower")
SCENE_SPLITS = {"train": (0.0, 0.65), "val": (0.70, 1.0)}   # rows of each photograph each split cuts patches from


def _scene(name: str) -> np.ndarray:
    """One scene photograph as an RGB uint8 array (H, W, 3)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        arr = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data
        arr = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def scene_patches(split: str, size: int = 32, per_class: int | None = None, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Square patches of every scene from `split`'s rows: (N, size, size, 3) uint8 and (N,) class indices.

    Each patch's side is 15-35 % of the photograph's shorter side (capped by the split's height), at a uniformly
    random place, resized with bilinear interpolation. Defaults: 200 patches per scene for `train`, 50 for `val`.
    """
    per_class = per_class or (200 if split == "train" else 50)
    images, labels = [], []
    for c, name in enumerate(SCENES):
        photo = _scene(name)
        rng = np.random.default_rng([seed, c, 0 if split == "train" else 1])
        for _ in range(per_class):
            y, x, side = patch_box(photo.shape[0], photo.shape[1], split, rng)
            patch = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
            images.append(np.asarray(patch))
            labels.append(c)
    return np.stack(images), np.asarray(labels)


def patch_box(h: int, w: int, split: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """(top, left, side) of one square patch of an `h` x `w` photograph inside `split`'s rows."""
    lo, hi = SCENE_SPLITS[split]
    top, bottom = int(lo * h), int(hi * h)
    side = min(int(min(h, w) * rng.uniform(0.15, 0.35)), bottom - top)
    return int(top + rng.integers(0, bottom - top - side + 1)), int(rng.integers(0, w - side + 1)), side


def build_scenes(out: str | Path, size: int = 32, seed: int = 0) -> Path:
    """Write the scene patches as `out/train/<scene>/*.jpg` and `out/val/<scene>/*.jpg`; skipped when complete."""
    out = Path(out)
    done = out / ".complete"
    settings = f"{len(SCENES)} scenes {SCENE_SPLITS} {size} px seed {seed}\n"
    if done.is_file() and done.read_text().endswith(settings):
        return out
    shutil.rmtree(out, ignore_errors=True)   # another setting, or an interrupted build: start again
    total = 0
    for split in SCENE_SPLITS:
        images, labels = scene_patches(split, size, seed=seed)
        for i, (img, c) in enumerate(zip(images, labels)):
            folder = out / split / SCENES[c]
            folder.mkdir(parents=True, exist_ok=True)
            _write_jpeg(Image.fromarray(img), folder / f"{i:05d}.jpg")
        total += len(images)
    done.write_text(f"{total} patches of {settings}")
    log.info("wrote %d scene patches to %s", total, out)
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


def build_demo_data(root: str | Path = "data/demo", size: int = 32) -> dict[str, Path]:
    """The embedded sets under `root` (scenes, digits, photos); returns their paths."""
    root = Path(root)
    return {"scenes": build_scenes(root / f"scenes{size}", size=size),
            "digits": build_digits(root / f"digits{size}", size=size),
            "photos": build_photos(root / "photos")}
