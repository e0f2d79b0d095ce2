"""What the converted formats and the trainer share on disk: atomic writes, sample references and the shard order.

Backends import from here, never from each other: the FFCV writer deals its samples in the same fixed order as the
DALI shards, and the trainer and checkpoints write files the same all-or-nothing way.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from byolfast.pipeline.contract import DataError

ORDER = "shuffled"            # the recorded "order" (manifest, beton meta, convert's settings) of `shard_order`
ORDER_SEED = 0x5EED5A3D

# One sample's bytes: `length` bytes at `offset` of the file `path`, then its class index.
SampleRef = tuple[str, int, int, int]


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
