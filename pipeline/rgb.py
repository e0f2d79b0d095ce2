"""Any PIL image as 8-bit upright RGB, read the same way by `byol convert` and the `torch` loader.

It lies below both (convert and the backends import it; it imports neither), so that an image the conversion keeps
and the same image read straight from a folder become the same pixels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

_EXIF_ORIENTATION = 0x0112


def exif_orientation(img: Image.Image) -> int | None:
    """A JPEG's EXIF orientation (1, as stored, for other formats or without the tag); None if the EXIF is malformed."""
    if img.format not in ("JPEG", "MPO"):
        return 1
    try:
        return img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF raises assorted errors
        return None


def upright_rgb(img: Image.Image, orientation: int) -> Image.Image:
    """`to_rgb`, turned as the EXIF `orientation` says (as DALI's decoders do). Shared by `byol convert` and the
    `torch` loader."""
    return ImageOps.exif_transpose(to_rgb(img)) if orientation not in (0, 1) else to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: 16/32-bit grayscale is scaled (PIL would clip it), transparency is dropped like torchvision does.
    Shared by `byol convert` and the `torch` loader, so both read such images alike."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and a.max() <= 1.0 else (65535.0 if a.max() > 255 else 255.0)
        img = Image.fromarray(np.clip(a * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode in ("P", "PA") and ("transparency" in img.info or img.mode == "PA"):
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")
