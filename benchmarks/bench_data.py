"""The benchmark's images: JPEG crops of the embedded photographs at a chosen size, and each backend's path to them.

Every loader decodes the same images at the same size: a backend with a format of its own gets them converted with
`max_side=0`, so DALI's shards hold each benchmark JPEG byte for byte (they are baseline 8-bit RGB without EXIF
rotation) and FFCV's file re-encodes each at the same size (`jpeg_quality`, the same chroma subsampling), so a
comparison between backends, or with another library reading the folder, decodes comparable JPEGs.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

PHOTO_SIZE = (320, 240)


def build_bench_images(root: str | Path, num_images: int, size: tuple[int, int] = PHOTO_SIZE,
                       seed: int = 0) -> Path:
    """`root/folder/<photo>/<n>.jpg`: random crops of scikit-image's photographs resized to `size` (w, h), a quarter
    of them portrait, JPEG quality 90; built once and reused while `num_images`, `size` and `seed` stay the same."""
    import numpy as np
    from PIL import Image

    from byolfast.pipeline.demo_data import build_photos

    root = Path(root)
    folder = root / "folder"
    stamp = folder / ".complete"
    settings = f"{num_images} images {size[0]}x{size[1]} seed {seed}, conversions at full size\n"
    if stamp.is_file() and stamp.read_text() == settings:
        return folder
    for stale in (folder, root / "converted"):   # other settings: start again, conversions included
        shutil.rmtree(stale, ignore_errors=True)
    photos = sorted(p for p in build_photos(root / "photos").glob("*/*.jpg"))
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in photos]
    for n in range(num_images):
        k = n % len(sources)
        img = sources[k]
        w, h = size if rng.random() >= 0.25 else size[::-1]
        scale = math.sqrt(rng.uniform(0.3, 1.0))
        cw = min(img.width, img.height * w / h) * scale
        ch = cw * h / w
        x0, y0 = rng.uniform(0, img.width - cw), rng.uniform(0, img.height - ch)
        crop = img.resize((w, h), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        out = folder / photos[k].parent.name / f"{n:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        crop.save(out, format="JPEG", quality=90)
    stamp.write_text(settings)
    log.info("wrote %d benchmark images to %s", num_images, folder)
    return folder


def backend_path(folder: Path, backend: str) -> str:
    """`data.path` of `backend` for the benchmark images, converting them on first use (the JPEGs kept as they are)
    when the backend reads a format of its own; "" for a backend that reads no images."""
    from byolfast.pipeline.registry import BACKENDS

    record = BACKENDS[backend]
    if record.bench_path is None:
        return ""
    if record.writer is None:
        return record.bench_path(folder)
    from byolfast.pipeline.convert import convert_dataset

    out = folder.parent / "converted"
    convert_dataset(str(folder), str(out), (backend,), workers=os.cpu_count() or 1, max_side=0, progress=False)
    return record.bench_path(out)


# --- output --------------------------------------------------------------------------------------------------------


def photo_size(text: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` (e.g. `500x375`) as (width, height); an argparse type."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w > 0 and h > 0:
            return w, h
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"--photo-size must be WIDTHxHEIGHT in pixels (e.g. 500x375), got {text!r}")
