"""`byol convert`: an ImageFolder tree (or a file list) -> DALI webdataset shards and an FFCV `.beton`.

Three steps, each in parallel worker processes:
  1. check + normalise (chunks of samples per task): every image is decoded with PIL. What cannot be decoded is
     skipped and reported with its reason (missing, empty, not an image, corrupt/truncated, smaller than
     `normalise.MIN_SIDE` px, or "huge": above PIL's decompression-bomb limit of 2 x `Image.MAX_IMAGE_PIXELS`,
     ~179 MP by default). Images between 1x and 2x that limit are decoded (JPEGs at reduced scale straight away) and
     downscaled. A baseline or progressive 8-bit RGB JPEG with no EXIF rotation and no side over `max_side` is kept byte
     for byte; anything else (PNG and other formats, CMYK, grayscale, palette, 16-bit, alpha (dropped, as torchvision's
     loader does), arithmetic/lossless/12-bit JPEG, EXIF-rotated, larger than `max_side`) is converted to RGB, rotated
     upright, resized so its longer side is `max_side` (antialiased bicubic; 0 keeps the size) and re-encoded as a
     baseline JPEG at `jpeg_quality`. `max_side=256` suits training at 224 px: a full-image crop needs no upsampling,
     and the stored dataset is several times smaller (and faster to decode) than full-size ImageNet. Re-encoded bytes go
     to a work folder (`out/.convert-work/`, removed at the end); kept images are read from the source.
  2. each requested format, by its backend's `Writer` (`pipeline.registry.BACKENDS`) into `out/<backend name>/`:
     DALI shards (`pipeline.backends.dali.format`) one shard per task of the worker pool, resumable; then the FFCV
     beton (`pipeline.backends.ffcv.format`) with FFCV's own writer processes.
Sample i is the i-th image that survived step 1, in the sorted listing (class, then path): its global index. The
shards and the beton both store the samples in one fixed shuffled order (`storage.shard_order`), each sample
carrying its global index, so that a reader's local shuffle (DALI's buffer, FFCV's quasi-random pages) still mixes
the classes.
Every output appears under its final name only once complete; a second run reports it complete or resumes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from PIL import ImageFile
from tqdm import tqdm

from byolfast.pipeline import storage
from byolfast.pipeline.backends import WriteJob
from byolfast.pipeline.contract import DataError
from byolfast.pipeline.convert.report import REPORT, ConvertReport, other_outputs, previous_report
from byolfast.pipeline.folder import scan_image_folder
from byolfast.pipeline.convert.normalise import SkipImage, normalise_file
from byolfast.pipeline.registry import BACKENDS, formats as writable_formats
from byolfast.pipeline.storage import SampleRef, write_json_atomic

logger = logging.getLogger(__name__)

WORK = ".convert-work"


def convert_dataset(src: str, out: str, formats: Sequence[str] = (), *, file_list: str | None = None,
                    workers: int = os.cpu_count() or 1, max_side: int = 256, jpeg_quality: int = 90,
                    ffcv_write_mode: str = "jpg", shard_size: int = 1000, progress: bool = True,
                    overwrite: bool = False) -> ConvertReport:
    """Convert an ImageFolder tree (or the images of `file_list`) under `src` into `out/dali/` and `out/ffcv/`.

    Args:
        src: `src/<class>/<image>` or `src/train/<class>/<image>`; with `file_list`, the root its paths are under.
        out: output folder (outside `src`); gets `dali/`, `ffcv/` and `convert_report.json`.
        formats: backends with a writer (`pipeline.registry.formats()`: "dali", "ffcv"); empty: all of them.
        file_list: text file of `relative/path<TAB or space>label` lines (`#` comments allowed); labels are all ints
            (class i is named "i") or else all class names (indexed in sorted order).
        workers: worker processes.
        max_side: longer side of stored images in pixels (0 keeps the size).
        jpeg_quality: quality of re-encoded JPEGs (and of FFCV's `jpg` write mode).
        ffcv_write_mode: FFCV's RGBImageField write mode (`jpg`, `raw` or `smart`).
        shard_size: samples per DALI shard.
        progress: show tqdm progress bars.
        overwrite: delete earlier output of the requested formats first.

    Raises:
        DataError: bad arguments, an unreadable source, no usable image, or an output made with other settings.
    """
    t0 = time.perf_counter()
    known = writable_formats()
    formats = list(dict.fromkeys(formats or known))
    if any(f not in known for f in formats):
        raise DataError(f"formats {formats}: choose from {', '.join(known)}")
    if max_side < 0 or not 1 <= jpeg_quality <= 100 or shard_size < 1 or workers < 1:
        raise DataError(f"need max_side >= 0, 1 <= jpeg_quality <= 100, shard_size >= 1, workers >= 1; got "
                        f"{max_side}, {jpeg_quality}, {shard_size}, {workers}")
    src_path, out_path = Path(src).resolve(), Path(out).resolve()
    if out_path == src_path or src_path in out_path.parents:
        raise DataError(f"output folder {out} is inside the source {src}: choose a folder outside it")
    samples, classes = list_samples(src_path, file_list)
    used = {label for _, label in samples}
    empty = [c for i, c in enumerate(classes) if i not in used]
    if empty:
        logger.warning("%d class(es) have no images: %s", len(empty), ", ".join(empty[:20]))
    listing = hashlib.sha256("\n".join([*classes, *(f"{os.path.relpath(p, src_path)}\t{y}" for p, y in samples)])
                             .encode("utf-8")).hexdigest()
    base = {"source": listing, "num_candidates": len(samples), "max_side": max_side, "jpeg_quality": jpeg_quality}
    options = {"shard_size": shard_size, "ffcv_write_mode": ffcv_write_mode}
    settings = {fmt: BACKENDS[fmt].writer.settings(base, options) for fmt in formats}
    if overwrite:
        for fmt in formats:
            shutil.rmtree(out_path / fmt, ignore_errors=True)
        shutil.rmtree(out_path / WORK, ignore_errors=True)
    outputs = {fmt: BACKENDS[fmt].writer.complete(out_path / fmt, settings[fmt]) for fmt in formats}
    todo = [fmt for fmt in formats if outputs[fmt] is None]
    if not todo:
        logger.info("%s: output complete (%s); nothing to do (overwrite=True rebuilds it)", out, ", ".join(formats))
        report = previous_report(out_path, src_path, len(samples), classes, empty)
        report.outputs = {**other_outputs(out_path, report, formats), **outputs}   # keep the formats not asked for
        report.num_samples = report.num_samples or next(iter(outputs.values()))["num_samples"]
    else:
        out_path.mkdir(parents=True, exist_ok=True)
        report = _convert(samples, classes, src_path, out_path, todo, base, settings, workers=workers,
                          progress=progress)
        report.empty_classes = empty
        report.outputs = {**other_outputs(out_path, report, formats),
                          **{f: o for f, o in outputs.items() if o is not None}, **report.outputs}
    report.seconds = time.perf_counter() - t0
    report.images_per_sec = report.num_candidates / max(report.seconds, 1e-9) if todo else 0.0
    write_json_atomic(out_path / REPORT, asdict(report))
    logger.info("%s", report.summary())
    return report


def list_samples(src: Path, file_list: str | None) -> tuple[list[tuple[str, int]], list[str]]:
    """`(absolute path, class index)` sorted by class then path, and the class names."""
    if file_list is None:
        return scan_image_folder(src, allow_empty_class=True, setting="the source folder")
    if not src.is_dir():
        raise DataError(f"source folder {str(src)!r} does not exist: the paths of {file_list} are relative to it")
    try:
        with open(file_list, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"cannot read file list {file_list!r}: {e}") from e
    entries: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit("\t", 1) if "\t" in text else text.rsplit(None, 1)
        if len(parts) != 2 or not parts[0].strip():
            raise DataError(f"{file_list}:{n}: expected 'relative/path<TAB or space>label', got {line!r}")
        rel, label = parts[0].strip(), parts[1].strip()
        if rel in entries:
            raise DataError(f"{file_list}:{n}: {rel!r} is listed twice; keep one line per image")
        entries[rel] = label
    if not entries:
        raise DataError(f"file list {file_list!r} lists no images")
    numeric = all(v.isascii() and v.isdigit() for v in entries.values())
    if numeric:   # class i is named "i"; "07" is class 7
        classes = [str(i) for i in range(max(int(v) for v in entries.values()) + 1)]
    else:         # names, in sorted order ("07" and "7" are then two classes)
        classes = sorted(set(entries.values()))
    to_index = {c: i for i, c in enumerate(classes)}
    samples = sorted((int(v) if numeric else to_index[v], rel) for rel, v in entries.items())
    return [(str(src / rel), y) for y, rel in samples], classes


def _convert(samples: list[tuple[str, int]], classes: list[str], src: Path, out: Path, todo: list[str], base: dict,
             settings: dict, *, workers: int, progress: bool) -> ConvertReport:
    """Step 1, then the writers of the formats in `todo`; `base` holds the settings of step 1, `settings` those of
    each format."""
    work = out / WORK
    # fork: workers inherit the listing instead of unpickling it; they run PIL and numpy only.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    outputs: dict[str, dict] = {}
    with _Workers(workers, ctx) as pool:
        records = _normalise_all(samples, work, base, pool, progress)
        refs: list[SampleRef] = []
        skipped, reencoded, passthrough, max_bytes, total_bytes = [], Counter(), 0, 0, 0
        for (path, label), (kind, reason, ref_path, offset, length, w, h) in zip(samples, records):
            if kind == "skip":
                skipped.append((os.path.relpath(path, src), reason))
                continue
            refs.append((ref_path or path, offset, length, label))
            max_bytes = max(max_bytes, w * h * 3)
            total_bytes += w * h * 3
            if kind == "pass":
                passthrough += 1
            else:
                reencoded[reason] += 1
        for path, reason in skipped:
            logger.warning("skipped %s: %s", path, reason)
        if not refs:
            shutil.rmtree(work, ignore_errors=True)
            raise DataError(f"none of the {len(samples)} images under {src} could be used: "
                            + "; ".join(f"{p}: {r}" for p, r in skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
        job = WriteJob(pool=pool, workers=workers, progress=progress, max_image_bytes=max_bytes,
                       total_bytes=total_bytes)
        for fmt in todo:   # formats written with the pool's workers
            if BACKENDS[fmt].writer.uses_pool:
                outputs[fmt] = BACKENDS[fmt].writer.write(out / fmt, refs, classes, settings[fmt], job)
    for fmt in todo:       # formats with their own writer processes, once the pool's have ended
        if not BACKENDS[fmt].writer.uses_pool:
            outputs[fmt] = BACKENDS[fmt].writer.write(out / fmt, refs, classes, settings[fmt], job)
    shutil.rmtree(work, ignore_errors=True)
    return ConvertReport(src=str(src), out=str(out), num_candidates=len(samples), num_samples=len(refs),
                         classes=classes, skipped=skipped, reencoded=dict(reencoded), passthrough=passthrough,
                         outputs=outputs)


class _Workers:
    """The conversion's worker processes, with `imap_unordered(fn, tasks)` as `multiprocessing.Pool` has it, except
    that a worker that dies (killed: out of memory, a crashing decoder) is an error naming what to do: `Pool` replaces
    the process and waits forever for the task it lost. Leaving on an exception (Ctrl-C included) stops the workers
    at once; what they finished stays on disk for the rerun."""

    def __init__(self, workers: int, ctx):
        from concurrent.futures import ProcessPoolExecutor
        self._executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)

    def __enter__(self) -> "_Workers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._executor.shutdown(wait=True)
            return
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            p.terminate()
        for p in processes:
            p.join(5)

    def imap_unordered(self, fn, tasks):
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool
        futures = [self._executor.submit(fn, task) for task in tasks]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BrokenProcessPool:
            raise DataError("a conversion worker process died (killed, e.g. out of memory: lower --workers or "
                            "--max-side); the finished part is kept: run the same command again to resume") from None
        finally:
            for future in futures:
                future.cancel()


def _init_worker() -> None:
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image must fail here, not be padded with grey


def _normalise_all(samples: list[tuple[str, int]], work: Path, base: dict, pool, progress: bool) -> list[tuple]:
    """Run `normalise_file` over every sample in chunks, reusing chunks a previous run finished with `base`.

    Returns, per sample: (kind "pass" | "staged" | "skip", reason, bytes path or None (the source), offset, length,
    width, height).
    """
    chunk = min(512, max(8, -(-len(samples) // 64)))  # a function of the listing only: chunks stay valid on resume
    plan = {"settings": base, "chunk": chunk}
    plan_path = work / "plan.json"
    if work.exists():
        try:
            with open(plan_path, encoding="utf-8") as f:
                same = json.load(f) == plan
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_path, plan)
    results: dict[int, list] = {}
    tasks = []
    for cid, start in enumerate(range(0, len(samples), chunk)):
        paths = [p for p, _ in samples[start:start + chunk]]
        done = _load_chunk(work, cid, len(paths))
        if done is None:
            tasks.append((str(work), cid, paths, base["max_side"], base["jpeg_quality"]))
        else:
            results[cid] = done
    with tqdm(total=len(samples), desc="check", unit="img", disable=not progress) as bar:
        bar.update(sum(len(r) for r in results.values()))
        for cid, recs in pool.imap_unordered(_normalise_chunk, tasks):
            results[cid] = recs
            bar.update(len(recs))
    out = []
    for cid in range(len(results)):
        bin_path = str(work / f"chunk-{cid:06d}.bin")
        out.extend((kind, reason, bin_path if kind == "staged" else None, off, n, w, h)
                   for kind, reason, off, n, w, h in results[cid])
    return out


def _load_chunk(work: Path, cid: int, count: int) -> list | None:
    try:
        with open(work / f"chunk-{cid:06d}.json", encoding="utf-8") as f:
            rec = json.load(f)
        if rec["count"] == count and (work / f"chunk-{cid:06d}.bin").stat().st_size == rec["bin_bytes"]:
            return rec["records"]
    except (OSError, json.JSONDecodeError, KeyError):
        pass  # no finished chunk: it is redone
    return None


def _normalise_chunk(task: tuple[str, int, list[str], int, int]) -> tuple[int, list]:
    """Worker: normalise a chunk of images; re-encoded bytes go to `chunk-XXXXXX.bin`, records to its `.json`."""
    work, cid, paths, max_side, quality = task
    records, blobs, offset = [], [], 0
    for path in paths:
        try:
            data, reason, size, (w, h) = normalise_file(path, max_side, quality)
        except SkipImage as e:
            records.append(("skip", str(e), 0, 0, 0, 0))
            continue
        except Exception as e:   # anything else is still about this one file: skip it, say why, keep converting
            records.append(("skip", f"unreadable: {type(e).__name__}: {e}", 0, 0, 0, 0))
            continue
        if data is None:
            records.append(("pass", None, 0, size, w, h))
        else:
            records.append(("staged", reason, offset, len(data), w, h))
            blobs.append(data)
            offset += len(data)
    base = Path(work) / f"chunk-{cid:06d}"
    storage.write_bytes_atomic(base.with_suffix(".bin"), b"".join(blobs))
    write_json_atomic(base.with_suffix(".json"), {"count": len(paths), "bin_bytes": offset, "records": records})
    return cid, records
