"""What the converted formats and the trainer share on disk: atomic writes, sample references, the shard order and
what `byol convert` skipped (`skipped_at_convert`, read by the loaders of converted data).

Backends import from here, never from each other: the FFCV writer deals its samples in the same fixed order as the
DALI shards, and the trainer and checkpoints write files the same all-or-nothing way.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from byolfast.pipeline.contract import DataError

logger = logging.getLogger(__name__)

ORDER = "shuffled"            # the recorded "order" (manifest, beton meta, convert's settings) of `shard_order`
ORDER_SEED = 0x5EED5A3D
REPORT = "convert_report.json"   # `byol convert`'s report, in its `out` folder beside the formats' folders

# One sample's bytes: `length` bytes at `offset` of the file `path`, then its class index.
SampleRef = tuple[str, int, int, int]


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 4 MiB blocks (shards and checkpoints are too large to read at once)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_ref(ref: SampleRef) -> bytes:
    """The bytes of one sample; raises DataError when its file changed or vanished since it was listed."""
    path, offset, length, _ = ref
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    except OSError as e:
        raise DataError(f"cannot read {path!r} ({e}): it changed during the conversion; run it again") from e
    if len(data) != length:
        raise DataError(f"{path!r} is shorter than when it was checked ({len(data)} < {length} bytes at "
                        f"{offset}): it changed during the conversion; run it again")
    return data


def shard_order(num_samples: int) -> np.ndarray:
    """The global indices in the order they are dealt to the shards: a fixed permutation of `range(num_samples)`."""
    return np.random.default_rng([ORDER_SEED, num_samples]).permutation(num_samples)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary name beside `path`, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write `obj` as JSON to a temporary name, then rename: readers see the old file or the whole new one."""
    write_bytes_atomic(Path(path), (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def skipped_at_convert(output: str | os.PathLike, num_samples: int | None = None) -> dict:
    """What `byol convert` left out of one of its outputs, from the `convert_report.json` above it.

    The report lies in the conversion's `out` folder, one level above `ffcv/train.beton` and `dali/`. It counts only
    when it lists `output` (at the same place relative to the report, so a moved `out` folder still matches) and,
    when `num_samples` is given, with that many samples; anything else is another conversion's report.

    Args:
        output: the beton file or the shard folder a loader reads.
        num_samples: the samples the loader found in `output`.

    Returns:
        {"convert_skipped": count, "convert_skip_reasons": {reason: count}, "convert_report": report path}, or {}
        when no report describes `output`.
    """
    output = Path(output).resolve()
    folder = output if output.is_dir() else output.parent
    for path in (folder / REPORT, folder.parent / REPORT):
        if not path.is_file():
            continue
        try:
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
            records = list(report["outputs"].values())
            skipped = [reason for _, reason in report["skipped"]]
            listed = [Path(r["path"]).resolve().relative_to(Path(report["out"]).resolve()) for r in records]
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            logger.warning("%s is unreadable (%s): cannot tell how many images `byol convert` skipped", path, e)
            return {}
        here = output.relative_to(path.parent)
        record = next((r for r, rel in zip(records, listed) if rel == here), None)
        if record is None:
            continue
        if num_samples is not None and record.get("num_samples") != num_samples:
            logger.warning("%s lists %s samples for %s, which holds %d: the report is from another conversion; "
                           "skipped images are not counted", path, record.get("num_samples"), output, num_samples)
            return {}
        reasons = Counter(r.split(":", 1)[0] for r in skipped)
        return {"convert_skipped": len(skipped), "convert_skip_reasons": dict(reasons), "convert_report": str(path)}
    return {}
