"""One image brought to what every loader decodes: an 8-bit RGB baseline/progressive JPEG no larger than `max_side`.

Used by `byol convert` (`pipeline.convert.dataset`) in its worker processes; the rules are in that module's
docstring.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from byolfast.pipeline.rgb import exif_orientation, upright_rgb

MIN_SIDE = 8  # smaller images cannot give a meaningful random resized crop
_PASS_SOF = (0xC0, 0xC2)  # baseline and progressive Huffman JPEG: what nvJPEG and every CPU decoder read


class SkipImage(Exception):
    """An image that cannot be used; the message is the reason reported for it."""


def normalise_file(path: str, max_side: int, quality: int) -> tuple[bytes | None, str | None, int, tuple[int, int]]:
    """Check one image and bring it to what every loader can decode.

    Returns:
        (new JPEG bytes, or None when the file is kept as it is; the reason it was re-encoded; the file's size;
        the stored (width, height)).

    Raises:
        SkipImage: the image cannot be used (the message says why).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SkipImage("missing: no such file") from None
    except OSError as e:
        raise SkipImage(f"unreadable: {e.strerror or e}") from None
    if not data:
        raise SkipImage("empty file: 0 bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF, palette and between-limits size warnings: the decision is ours
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise SkipImage("not an image: no decoder recognises it") from None
        except Image.DecompressionBombError as e:
            raise SkipImage(f"huge: {e}") from None
        except Exception as e:  # decoders raise many types on malformed headers; any of them means unusable
            raise SkipImage(f"corrupt: {type(e).__name__}: {e}") from None
        with img:
            return _normalise(img, data, max_side, quality)


def _normalise(img: Image.Image, data: bytes, max_side: int, quality: int):
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise SkipImage(f"too small: {w}x{h} px (min side {MIN_SIDE})")
    orientation = exif_orientation(img)
    bad_exif = orientation is None  # re-encoding drops the malformed EXIF, so every decoder agrees
    if bad_exif:
        orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    scale = max_side / max(w, h) if max_side and max(w, h) > max_side else 1.0
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    if min(tw, th) < MIN_SIDE:
        raise SkipImage(f"too small: {w}x{h} px is {tw}x{th} at max_side {max_side} (min side {MIN_SIDE})")
    if img.format == "JPEG" and scale <= 0.5:
        img.draft(None, (2 * th, 2 * tw) if orientation in (5, 6, 7, 8) else (2 * tw, 2 * th))  # DCT-domain 1/2..1/8
    try:
        img.load()
    except Exception as e:  # truncated or corrupt data: PIL raises OSError, ValueError, SyntaxError, struct.error...
        raise SkipImage(f"corrupt: {e}") from None
    sof = _jpeg_sof(data) if img.format == "JPEG" else None
    if img.format != "JPEG":
        reason = f"format {img.format}"
    elif img.mode != "RGB":
        reason = f"mode {img.mode}"
    elif sof is None or sof[0] not in _PASS_SOF or sof[1] != 8 or not data.endswith(b"\xff\xd9"):
        reason = "jpeg coding"
    elif orientation not in (0, 1):
        reason = "exif orientation"
    elif bad_exif:
        reason = "corrupt exif"
    elif scale < 1.0:
        reason = "resize"
    else:
        return None, None, len(data), (w, h)
    try:
        rgb = upright_rgb(img, orientation)
        if rgb.size != (tw, th):
            rgb = rgb.resize((tw, th), Image.Resampling.BICUBIC)  # antialiased in PIL; ~Lanczos quality, faster
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality)
    except (OSError, ValueError, MemoryError) as e:   # e.g. a side JPEG cannot store (65,535 px), odd modes
        raise SkipImage(f"cannot be re-encoded as JPEG ({reason}): {e}") from None
    return buf.getvalue(), reason, len(data), (tw, th)


def _jpeg_sof(data: bytes) -> tuple[int, int] | None:
    """(SOF marker, sample precision) of a JPEG stream, read from its headers; None if malformed."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return (marker, data[i + 4]) if i + 4 < len(data) else None
        if marker == 0xDA:  # scan data before any frame header
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None
