"""The shard format the DALI backend reads: webdataset tars with DALI index files and a manifest.

Layout of a shard folder (`<out>/dali/`):

    shard-000000.tar   up to `shard_size` samples in the shard order (below); per sample, key `%08d` of its global
                       index:
                       `<key>.jpg` (RGB JPEG bytes), `<key>.cls` (ASCII decimal class index, webdataset's convention),
                       `<key>.label` (int64 little-endian class index), `<key>.index` (int64 little-endian global index)
    shard-000000.idx   DALI's webdataset index (the text format `wds2idx` writes, version v1.2)
    manifest.json      {"format": "byolfast-wds-v1", "classes", "num_samples", "shard_size", "shards": [{"tar",
                       "index", "count", "sha256", "bytes"}], "order", ...}; written last, so its presence means
                       complete
    progress.jsonl     completed shards of an unfinished run (a re-run skips them); removed once the manifest is written

Shard order: the samples are dealt to the shards in one fixed random permutation of the global indices
(`shard_order`), not in index order. The listing is sorted by class, and the reader only shuffles the tars and a
window of a few thousand samples, so shards in index order would give batches of a few classes: a shuffled shard
holds a sample of the whole dataset. The permutation depends only on the sample count, so a resumed conversion deals
the same shards.

Read it with `fn.readers.webdataset(paths=..., index_paths=..., ext=["jpg", "label", "index"],
dtypes=[types.UINT8, types.INT64, types.INT64])`. Tars are plain ustar with fixed owner and mtime, so a shard's bytes
(and its sha256) depend only on its samples.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from byolfast.pipeline.contract import DataError
from byolfast.pipeline.storage import (ORDER, SampleRef, read_ref, sha256_file, shard_order, write_bytes_atomic,
                                       write_json_atomic)

logger = logging.getLogger(__name__)

FORMAT = "byolfast-wds-v1"
MANIFEST = "manifest.json"
PROGRESS = "progress.jsonl"
EXTENSIONS = ("jpg", "cls", "label", "index")  # member order inside each sample
INDEX_VERSION = "v1.2"  # the version line DALI's wds2idx writes

# A map over tasks that yields results as they finish (a process pool's imap_unordered, or the builtin map).
TaskMap = Callable[[Callable, Iterable], Iterator]


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}"


def build_shard(indices: Sequence[int], refs: Sequence[SampleRef]) -> tuple[bytes, str]:
    """One shard's tar bytes and its DALI index text, for the samples of global indices `indices`."""
    buf = io.BytesIO()
    lines = [f"{INDEX_VERSION} {len(refs)}"]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index, ref in zip(indices, refs):
            index, label = int(index), ref[3]
            key = f"{index:08d}"
            payloads = (read_ref(ref), str(label).encode("ascii"), label.to_bytes(8, "little", signed=True),
                        index.to_bytes(8, "little", signed=True))
            parts = []
            for ext, payload in zip(EXTENSIONS, payloads):
                name = f"{key}.{ext}"
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                # A ustar member is one 512-byte header then its data: DALI's index points at the data.
                parts.append(f"{ext} {tar.offset + tarfile.BLOCKSIZE} {len(payload)} {name}")
                tar.addfile(info, io.BytesIO(payload))
            lines.append(" ".join(parts))
    return buf.getvalue(), "\n".join(lines) + "\n"


def _write_shard_task(task: tuple[str, int, list[int], list[SampleRef]]) -> dict:
    """Worker: write one shard (temporary names, then rename) and return its manifest record."""
    folder, shard_id, indices, refs = task
    tar_bytes, idx_text = build_shard(indices, refs)
    base = Path(folder) / shard_name(shard_id)
    tar_path, idx_path = base.with_suffix(".tar"), base.with_suffix(".idx")
    write_bytes_atomic(idx_path, idx_text.encode("ascii"))
    write_bytes_atomic(tar_path, tar_bytes)  # the tar last: a tar without its progress record is redone anyway
    return {"tar": tar_path.name, "index": idx_path.name, "count": len(refs),
            "sha256": hashlib.sha256(tar_bytes).hexdigest(), "bytes": len(tar_bytes),
            "index_bytes": len(idx_text), "shard": shard_id}


def _load_progress(folder: Path, settings: dict) -> dict[int, dict]:
    """Completed shards recorded by an earlier run with the same settings whose files are still intact."""
    path = folder / PROGRESS
    if not path.exists():
        return _load_finished(folder, settings)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    records: list[dict] = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by an interruption: everything after it is unknown
    if not records or records[0].get("settings") != settings:
        logger.info("%s: earlier shards were written with other settings; starting over", folder)
        return {}
    done = {}
    for rec in records[1:]:
        tar, idx = folder / rec["tar"], folder / rec["index"]
        if (tar.is_file() and tar.stat().st_size == rec["bytes"]
                and idx.is_file() and idx.stat().st_size == rec["index_bytes"]):
            done[rec["shard"]] = rec
    return done


def _load_finished(folder: Path, settings: dict) -> dict[int, dict]:
    """The intact shards of a finished folder that has since been damaged (checked by sha256: a rare, slow path)."""
    try:
        with open(folder / MANIFEST, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest["settings"] != settings:
            return {}
        shards = manifest["shards"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}
    done = {}
    for k, s in enumerate(shards):
        tar, idx = folder / s["tar"], folder / s["index"]
        if (tar.is_file() and tar.stat().st_size == s["bytes"] and sha256_file(tar) == s["sha256"] and idx.is_file()
                and not index_problem(idx, s["count"])):
            done[k] = {**s, "shard": k, "index_bytes": idx.stat().st_size}
    return done


def index_problem(path: Path, count: int) -> str:
    """Why the DALI index `path` does not describe `count` samples ("" when it does): its version line, then one line
    per sample (a truncated index would make DALI read past what it lists)."""
    with open(path, encoding="ascii", errors="replace") as f:
        head = f.readline().split()
        if len(head) != 2 or head[0] != INDEX_VERSION or head[1] != str(count):
            return f"starts {' '.join(head)!r}, expected '{INDEX_VERSION} {count}'"
        lines = sum(1 for line in f if line.strip())
    return "" if lines == count else f"lists {lines} of its {count} samples (truncated)"


def write_shards(folder: str | os.PathLike, refs: Sequence[SampleRef], classes: Sequence[str], shard_size: int,
                 settings: dict, task_map: TaskMap = map,
                 on_samples: Callable[[int], None] | None = None) -> tuple[dict, int]:
    """Write (or finish writing) the shard folder for `refs`, sample i being global index i, in `shard_order`.

    Shards are independent tasks run through `task_map` (a process pool's imap_unordered: one shard per task). Each
    finished shard is appended to `progress.jsonl`; a re-run with the same `settings` skips shards whose files still
    have the recorded sizes and rewrites the rest (a leftover `.tmp` never counts). Repairing a finished folder that
    was damaged keeps the shards whose sha256 still matches its manifest. `manifest.json` comes last.

    Returns:
        (the manifest, how many shards an earlier run had already finished).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if shard_size < 1:
        raise DataError(f"shard_size must be >= 1, got {shard_size}")
    num_shards = (len(refs) + shard_size - 1) // shard_size
    order = shard_order(len(refs))
    done = {k: v for k, v in _load_progress(folder, settings).items() if k < num_shards
            and v["count"] == len(order[k * shard_size:(k + 1) * shard_size])}
    (folder / MANIFEST).unlink(missing_ok=True)  # being written: never looks finished
    resumed = len(done)
    if done:
        logger.info("%s: resuming, %d of %d shards already complete", folder, len(done), num_shards)
    else:
        for stale in folder.glob("shard-*"):
            stale.unlink()
    with open(folder / PROGRESS, "w", encoding="utf-8") as f:  # rewrite: the header, then what is still valid
        f.write(json.dumps({"settings": settings}) + "\n")
        for rec in done.values():
            f.write(json.dumps(rec) + "\n")
    if on_samples is not None and done:
        on_samples(sum(r["count"] for r in done.values()))
    tasks = []
    for k in range(num_shards):
        if k not in done:
            indices = order[k * shard_size:(k + 1) * shard_size].tolist()
            tasks.append((str(folder), k, indices, [refs[i] for i in indices]))
    with open(folder / PROGRESS, "a", encoding="utf-8") as progress:
        for rec in task_map(_write_shard_task, tasks):
            done[rec["shard"]] = rec
            progress.write(json.dumps(rec) + "\n")
            progress.flush()
            os.fsync(progress.fileno())
            if on_samples is not None:
                on_samples(rec["count"])
    shards = [{k: done[s][k] for k in ("tar", "index", "count", "sha256", "bytes")} for s in range(num_shards)]
    manifest = {"format": FORMAT, "classes": list(classes), "num_samples": len(refs), "shard_size": shard_size,
                "shards": shards, "extensions": list(EXTENSIONS), "order": ORDER, "settings": settings}
    write_json_atomic(folder / MANIFEST, manifest)
    (folder / PROGRESS).unlink()
    return manifest, resumed


def _manifest_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (p / MANIFEST, p / "dali" / MANIFEST):
        if candidate.is_file():
            return candidate
    raise DataError(f"no {MANIFEST} in {str(p)!r}: it is not a finished shard folder; run "
                    f"`byol convert SRC OUT` (shards go to OUT/dali) and point data.path at OUT/dali")


def load_manifest(path: str | os.PathLike, verify: bool = False) -> dict:
    """Read and validate a shard folder's manifest (`path`: the folder, its parent `out`, or the manifest itself).

    Checks every shard's tar and index exist, the tar has the recorded size and the index the recorded sample count;
    with `verify`, also each tar's sha256 (reads everything: slow on big datasets).

    Returns:
        the manifest, plus "dir" (the folder), "tar_paths" and "index_paths" (absolute paths, in shard order).

    Raises:
        DataError: what is missing, truncated or inconsistent, and what to do.
    """
    mpath = _manifest_path(path)
    folder = mpath.parent
    redo = "re-run `byol convert` for this output (it rewrites only what is missing or damaged)"
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{mpath}: unreadable manifest ({e}); {redo}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{mpath}: not a {FORMAT} manifest (format {found!r}); {redo}")
    for key in ("classes", "num_samples", "shard_size", "shards"):
        if key not in manifest:
            raise DataError(f"{mpath}: manifest has no {key!r}; {redo}")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"tar", "index", "count", "bytes"} <= s.keys()
                                               for s in shards):
        raise DataError(f"{mpath}: a shard entry lacks tar/index/count/bytes; {redo}")
    total = sum(s["count"] for s in shards)
    if total != manifest["num_samples"]:
        raise DataError(f"{mpath}: shard counts add up to {total}, not num_samples={manifest['num_samples']}; {redo}")
    for s in shards:
        tar, idx = folder / s["tar"], folder / s["index"]
        if not tar.is_file():
            raise DataError(f"shard {tar} is missing; {redo}")
        size = tar.stat().st_size
        if size != s["bytes"]:
            raise DataError(f"shard {tar} has {size} bytes, the manifest says {s['bytes']} (truncated or "
                            f"modified); {redo}")
        if not idx.is_file():
            raise DataError(f"index {idx} is missing; {redo}")
        problem = index_problem(idx, s["count"])
        if problem:
            raise DataError(f"index {idx} {problem}; {redo}")
        if verify and sha256_file(tar) != s["sha256"]:
            raise DataError(f"shard {tar}: sha256 mismatch (corrupted); {redo}")
    manifest["dir"] = str(folder.resolve())
    manifest["tar_paths"] = [str((folder / s["tar"]).resolve()) for s in shards]
    manifest["index_paths"] = [str((folder / s["index"]).resolve()) for s in shards]
    return manifest


# --- `byol convert`'s writer (the `Writer` of this backend's record) ------------------------------------------------
def convert_settings(base: dict, options: dict) -> dict:
    """The settings recorded in the manifest: convert's shared ones, the shard size and the sample order."""
    return {**base, "shard_size": options["shard_size"], "order": ORDER}


def complete_output(folder: Path, settings: dict) -> dict | None:
    """The output record of a finished shard folder made with `settings`; None if unfinished or damaged (it is then
    rewritten where damaged); DataError if it was made from another source or with other settings."""
    try:
        with open(folder / MANIFEST, encoding="utf-8") as f:
            old = json.load(f).get("settings")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if old != settings:
        raise DataError(f"{folder} was made from another source or with other settings ({old} vs "
                        f"{settings}): pass overwrite=True (`--overwrite`) or choose another output folder")
    try:
        manifest = load_manifest(folder)
    except DataError as e:
        logger.warning("%s; rewriting what is damaged", e)
        return None
    return {"status": "complete", "path": manifest["dir"], "num_samples": manifest["num_samples"],
            "num_shards": len(manifest["shards"]), "bytes": sum(s["bytes"] for s in manifest["shards"])}


def write_output(folder: Path, refs: Sequence[SampleRef], classes: Sequence[str], settings: dict, job) -> dict:
    """Write the shards with convert's worker pool (`job.pool`, one shard per task); the output record."""
    from tqdm import tqdm

    with tqdm(total=len(refs), desc="dali", unit="img", disable=not job.progress) as bar:
        manifest, resumed = write_shards(folder, refs, classes, settings["shard_size"], settings,
                                         job.pool.imap_unordered, bar.update)
    return {"status": "resumed" if resumed else "written", "path": str(folder), "num_samples": len(refs),
            "num_shards": len(manifest["shards"]), "bytes": sum(s["bytes"] for s in manifest["shards"])}
