"""The file the FFCV backend reads: `<out>/ffcv/train.beton`, with `classes.json` and `meta.json` beside it.

Fields, in this order: `image` (`RGBImageField(write_mode, max_resolution=max_side, jpeg_quality)`), `label`
(`IntField`, the class index) and `index` (`IntField`, the global sample index). `classes.json` is the JSON list of
class names (position = class index); `meta.json` records the settings the file was made with and the sample order.
The beton is written as `train.beton.tmp` and renamed when complete, so a `train.beton` is always whole.

Sample order: the beton stores the samples in the DALI shards' fixed permutation (`storage.shard_order`), so the
sample at position p has global index `shard_order(n)[p]` (its `index` field). The global indices are sorted by class,
and FFCV's quasi-random order draws each batch from a window of 2 x batch-size pages: pages in class order would
give batches of fewer classes than a uniform shuffle; shuffled pages each hold a sample of the whole dataset, and the
batches are as mixed as uniform ones. The loader reports the `index` field and seeds each sample's crop from it, so
consumers see global indices whatever the storage order. Betons stored in class order (position = global index,
meta.json without "order") are still read; `byol convert`, run again over one, asks for `--overwrite` instead of
taking it for complete.

FFCV's own reader (1.0.2) does not say when a file is cut short: `ffcv.reader.Reader` fails with "IndexError: index 0
is out of bounds" (shorter than the header) or "ValueError: negative dimensions are not allowed" (cut before the
allocation table), and, cut inside the table, opens it without complaint with images missing from the table, which a
`Loader` then serves as garbage or crashes on. `load_beton_meta` checks the layout with plain numpy (no FFCV import,
which costs seconds of numba compilation) and names the problem instead.
"""
from __future__ import annotations

import _thread
import ctypes
import io
import json
import logging
import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from byolfast.pipeline.contract import DataError
from byolfast.pipeline.storage import ORDER, SampleRef, read_ref, shard_order, write_json_atomic

logger = logging.getLogger(__name__)

BETON = "train.beton"
CLASSES = "classes.json"
META = "meta.json"
FIELDS = ("image", "label", "index")
WRITE_MODES = ("jpg", "raw", "smart")

# FFCV 1.0.2's on-disk layout (ffcv/types.py, file version 2), repeated here so that checking a file needs no FFCV.
FFCV_VERSION = 2
HEADER_TYPE = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                        ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESC_TYPE = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
ALLOC_TABLE_TYPE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
MIN_PAGE_SIZE = 8 << 20  # FFCV's default page (4 x 2 MiB)


class NormalisedImages:
    """The indexable dataset FFCV's writer reads: position p is (uint8 HWC RGB image, class index, global index) of
    sample `order[p]`.

    Images are the converter's normalised JPEG bytes, decoded. A failure is recorded in shared memory before the
    worker dies, so that the parent can stop waiting for it (FFCV's writer would otherwise wait forever).
    """

    def __init__(self, refs: Sequence[SampleRef], order: np.ndarray):
        self.refs = refs
        self.order = order
        self.error = multiprocessing.Array(ctypes.c_char, 4096)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> tuple[np.ndarray, int, int]:
        i = int(self.order[position])
        ref = self.refs[i]
        try:
            with Image.open(io.BytesIO(read_ref(ref))) as img:
                image = np.asarray(img.convert("RGB"))
        except (DataError, OSError, ValueError) as e:
            self.error.value = f"sample {i} ({ref[0]}): {e}".encode("utf-8", "replace")[:4095]
            raise
        return image, ref[3], i


def stored_indices(index_field: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """The `index` field by position (the global index of each stored sample), checked to be a permutation of
    `range(num_samples)`.

    Raises:
        DataError: the field does not hold each index once.
    """
    index = np.ascontiguousarray(index_field, dtype=np.int64)
    n = len(index)
    if n and (index.min() < 0 or index.max() >= n or (np.bincount(index, minlength=n) != 1).any()):
        raise DataError(f"{str(path)!r}: field `index` does not hold each of 0..{n - 1} once: delete it and run "
                        "`byol convert` again")
    return index


def stored_in_class_order(labels: np.ndarray) -> bool:
    """True when the labels by position never decrease and are not all one: the samples are stored class by class."""
    labels = np.asarray(labels)
    return len(labels) > 1 and labels[0] != labels[-1] and bool((np.diff(labels) >= 0).all())


def page_size_for(max_image_bytes: int, total_bytes: int) -> int:
    """A power-of-two page that holds the largest image (FFCV cannot split one sample across pages).

    FFCV's default 8 MiB, or its 2 MiB minimum for datasets under 64 MiB (each writer process leaves a part-filled
    page, which would dwarf a small file).
    """
    size = MIN_PAGE_SIZE if total_bytes >= 64 << 20 else 2 << 20
    while size < 2 * max_image_bytes:
        size *= 2
    if size >= 1 << 32:
        raise DataError(f"an image of {max_image_bytes} bytes is too large for FFCV's pages: set max_side")
    return size


def beton_is_complete(folder: str | os.PathLike, settings: dict) -> bool:
    """True when `folder` holds a whole beton made with `settings` (a damaged one is not: it gets rewritten).

    Raises:
        DataError: the beton was made from another source or with other settings.
    """
    folder = Path(folder)
    if not (folder / BETON).exists():
        return False
    try:
        with open(folder / META, encoding="utf-8") as f:
            old = json.load(f).get("settings")
    except (OSError, json.JSONDecodeError, AttributeError):
        old = None
    if isinstance(old, dict) and old.get("order") != settings.get("order") and \
            {k: v for k, v in old.items() if k != "order"} == {k: v for k, v in settings.items() if k != "order"}:
        raise DataError(f"{folder / BETON} holds the samples in class order (written by an earlier byol convert), "
                        f"which gives batches of fewer classes under data.ffcv.order=quasi_random: pass "
                        f"overwrite=True (`--overwrite`) to write it again in the shuffled order")
    if old != settings:
        raise DataError(f"{folder / BETON} exists but was made from another source or with other settings "
                        f"({old} vs {settings}): pass overwrite=True (`--overwrite`) or choose another output folder")
    try:
        load_beton_meta(folder / BETON)
    except DataError as e:
        logger.warning("%s; rewriting it", e)
        return False
    return True


def write_beton(folder: str | os.PathLike, refs: Sequence[SampleRef], classes: Sequence[str], *, max_side: int,
                jpeg_quality: int, write_mode: str, workers: int, max_image_bytes: int, total_bytes: int,
                settings: dict,
                progress: bool = True) -> dict:
    """Write `folder/train.beton` from the normalised samples `refs` (sample i is global index i), in `shard_order`.

    Returns:
        what `load_beton_meta` returns for the finished file.
    """
    if write_mode not in WRITE_MODES:
        raise DataError(f"unknown FFCV write mode {write_mode!r}: choose one of {', '.join(WRITE_MODES)}")
    from ffcv import writer as ffcv_writer  # FFCV (numba) is imported only when a beton is written
    from ffcv.fields import IntField, RGBImageField
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final, tmp = folder / BETON, folder / (BETON + ".tmp")
    tmp.unlink(missing_ok=True)  # an interrupted earlier run: FFCV cannot resume a file, start it again
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_side or None,
                                     jpeg_quality=jpeg_quality),
              "label": IntField(), "index": IntField()}
    writer = ffcv_writer.DatasetWriter(str(tmp), fields, page_size=page_size_for(max_image_bytes, total_bytes),
                                       num_workers=max(1, workers))
    dataset = NormalisedImages(refs, shard_order(len(refs)))
    chunk = max(1, min(100, len(refs) // (4 * max(1, workers))))
    original_tqdm = ffcv_writer.tqdm
    ffcv_writer.tqdm = lambda *a, **k: original_tqdm(*a, **k, disable=not progress, desc="ffcv", unit="img")
    try:
        _run_watched(lambda: writer.from_indexed_dataset(dataset, chunksize=chunk), dataset, writer, tmp)
    finally:
        ffcv_writer.tqdm = original_tqdm
    meta = load_beton_meta(tmp)
    if meta["num_samples"] != len(refs):
        raise DataError(f"{tmp}: holds {meta['num_samples']} samples, expected {len(refs)}; run the conversion again")
    write_json_atomic(folder / CLASSES, list(classes))
    write_json_atomic(folder / META, {"settings": settings, "num_samples": len(refs), "fields": list(FIELDS),
                                      "order": ORDER})
    os.replace(tmp, final)
    meta["path"] = str(final)
    return meta


def _run_watched(write, dataset: NormalisedImages, writer, tmp: Path) -> None:
    """Run FFCV's writer, stopping it when one of its workers fails instead of waiting forever.

    FFCV's writer polls a counter in a loop; the watcher stops it with a KeyboardInterrupt in the main thread, sent
    again every second until the main thread has taken it (one that lands inside code that swallows it is not
    lost), under Python's default SIGINT handler (a handler left by someone else would take it instead).
    """
    stop, failed = threading.Event(), threading.Event()
    seen: dict[int, multiprocessing.Process] = {}

    def watch() -> None:
        while not stop.wait(0.2):
            for p in multiprocessing.active_children():
                seen[p.pid] = p
            if dataset.error.value or any(p.exitcode not in (None, 0) for p in seen.values()):
                failed.set()
                while not stop.is_set():
                    _thread.interrupt_main()
                    stop.wait(1.0)
                return

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if in_main else None
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        write()
        stop.set()
        watcher.join()
    except KeyboardInterrupt:
        stop.set()
        while True:   # the watcher may send one more before it sees `stop`
            try:
                watcher.join()
                break
            except KeyboardInterrupt:
                continue
        for p in seen.values():
            if p.is_alive():
                p.terminate()
                p.join()
        sm = getattr(writer, "metadata_sm", None)
        if hasattr(sm, "unlink"):
            sm.close()
            sm.unlink()
        tmp.unlink(missing_ok=True)
        if failed.is_set():
            detail = dataset.error.value.decode("utf-8", "replace") or "a writer process died"
            raise DataError(f"writing {tmp.with_suffix('')} failed: {detail}") from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def load_beton_meta(path: str | os.PathLike) -> dict:
    """Check that a beton is whole and return what it holds, without importing FFCV.

    Returns:
        {"path", "num_samples", "fields", "page_size", "bytes", "classes" (from classes.json beside it, or None)}.

    Raises:
        DataError: missing, not a beton, of another version, unfinished or truncated, and what to do.
    """
    path = Path(path)
    redo = "re-run `byol convert` (it rewrites a damaged file)"
    if not path.is_file():
        raise DataError(f"FFCV file {str(path)!r} does not exist: run `byol convert SRC OUT` and point data.path "
                        f"at OUT/ffcv/{BETON}")
    size = path.stat().st_size
    if size < HEADER_TYPE.itemsize:
        raise DataError(f"{path}: {size} bytes, too short for an FFCV file (truncated); {redo}")
    header = np.fromfile(path, dtype=HEADER_TYPE, count=1)[0]
    if int(header["version"]) != FFCV_VERSION:
        raise DataError(f"{path}: not an FFCV v{FFCV_VERSION} file (version field {int(header['version'])}); {redo}")
    num_samples, num_fields = int(header["num_samples"]), int(header["num_fields"])
    table_at = int(header["alloc_table_ptr"])
    desc_end = HEADER_TYPE.itemsize + num_fields * FIELD_DESC_TYPE.itemsize
    if table_at == 0:
        raise DataError(f"{path}: unfinished (the writer never wrote its allocation table); {redo}")
    if table_at < desc_end or table_at > size or (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        raise DataError(f"{path}: truncated ({size} bytes; its allocation table starts at {table_at}); {redo}")
    descs = np.fromfile(path, dtype=FIELD_DESC_TYPE, count=num_fields, offset=HEADER_TYPE.itemsize)
    names = [bytes(d["name"]).split(b"\0", 1)[0].decode("ascii", "replace") for d in descs]
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_at)
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_at:
        raise DataError(f"{path}: allocations reach past the data region (truncated or corrupted); {redo}")
    if names[:1] == ["image"] and len(np.unique(table["sample_id"])) != num_samples:
        raise DataError(f"{path}: {len(np.unique(table['sample_id']))} of {num_samples} images are allocated "
                        f"(truncated or corrupted); {redo}")
    classes = None
    if (path.parent / CLASSES).is_file():
        try:
            with open(path.parent / CLASSES, encoding="utf-8") as f:
                classes = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path.parent / CLASSES}: unreadable class list ({e}); {redo}") from None
    return {"path": str(path), "num_samples": num_samples, "fields": names, "page_size": int(header["page_size"]),
            "bytes": size, "classes": classes}


# --- `byol convert`'s writer (the `Writer` of this backend's record) ------------------------------------------------
def convert_settings(base: dict, options: dict) -> dict:
    """The settings recorded in `meta.json`: convert's shared ones, FFCV's write mode and the sample order."""
    mode = options["ffcv_write_mode"]
    if mode not in WRITE_MODES:
        raise DataError(f"ffcv_write_mode {mode!r}: choose one of {', '.join(WRITE_MODES)}")
    return {**base, "write_mode": mode, "order": ORDER}


def complete_output(folder: Path, settings: dict) -> dict | None:
    """The output record of a whole beton made with `settings`; None if missing or damaged; DataError if made
    otherwise (`beton_is_complete`)."""
    if not beton_is_complete(folder, settings):
        return None
    meta = load_beton_meta(folder / BETON)
    return {"status": "complete", "path": meta["path"], "num_samples": meta["num_samples"], "bytes": meta["bytes"]}


def write_output(folder: Path, refs: Sequence[SampleRef], classes: Sequence[str], settings: dict, job) -> dict:
    """Write the beton with FFCV's own writer processes (after convert's pool has closed); the output record."""
    meta = write_beton(folder, refs, classes, max_side=settings["max_side"], jpeg_quality=settings["jpeg_quality"],
                       write_mode=settings["write_mode"], workers=job.workers, max_image_bytes=job.max_image_bytes,
                       total_bytes=job.total_bytes, settings=settings, progress=job.progress)
    return {"status": "written", "path": meta["path"], "num_samples": meta["num_samples"], "bytes": meta["bytes"]}
