"""First contact with a machine: import DALI and FFCV, and draw one two-view batch of each on the device.

    python -m byolfast.benchmarks.smoke --out RESULTS/smoke.json [--device cuda] [--work /tmp/byol-smoke]

Each check is a record: `name`, `status` (`ok`; `missing` when the package is not installed; `failed`), `seconds`,
what it found, and for a failure `error`, the whole `traceback` and `missing_module` where a dependency is absent
(`benchmarks.common.error_fields`). The JSON is rewritten after every check, so a run stopped at its time cap keeps
the checks it finished. The checks, in order:
  - `versions`: python, torch and its CUDA, the device, numpy, numba (what the rest ran with);
  - `dali_import`, `ffcv_import`: the import itself, with the installed version (FFCV's `__version__` is wrong);
  - `dali_batch`: one batch of `DaliTwoViewLoader` with the `mixed` decoder (nvJPEG) on the device, from a folder of
    small JPEGs written here; it fails when the loader falls back to the CPU decoder;
  - `ffcv_batch`: one batch of `FfcvTwoViewLoader` from a beton of the same JPEGs (`byol convert`), through
    `ToDevice` and the colour augmentation on the device; its first batch compiles FFCV's numba code.
Both batches are checked against the batch contract (`pipeline.contract.check_batch`) and for finite, distinct views.
With `--device cpu` (a rehearsal) the same loaders run on the CPU. Exit status 0 when every check is ok, else 1.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from byolfast.benchmarks.common import error_fields, write_json

log = logging.getLogger(__name__)

# package -> (module to import, distribution names for the version)
PACKAGES = {"dali": ("nvidia.dali", ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali")),
            "ffcv": ("ffcv", ("ffcv",))}
IMAGES = 16
IMAGE_SIZE = 32
BATCH = 8


class Missing(Exception):
    """A check that cannot run because a package is not installed (its status is `missing`)."""


def import_package(package: str) -> dict:
    """Import `package` (`dali` or `ffcv`); its version and location. Raises Missing when it is not installed (a
    ModuleNotFoundError for the package itself), anything else as it comes (a broken install fails the check)."""
    module, dists = PACKAGES[package]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise Missing(f"{module} is not installed ({e})") from e
        raise
    version = None
    for dist in dists:
        try:
            version = f"{importlib.metadata.version(dist)} ({dist})"
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"version": version, "path": str(Path(mod.__file__ or "").parent)}


def versions(device: str) -> dict:
    import numpy
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available(), "numpy": numpy.__version__}
    if torch.cuda.is_available():
        found["device_name"] = torch.cuda.get_device_name(0)
    try:
        found["numba"] = importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        found["numba"] = None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} but torch sees no CUDA device (torch {torch.__version__}, built for "
                           f"CUDA {torch.version.cuda})")
    return found


def write_images(folder: Path, n: int = IMAGES) -> Path:
    """`folder/<class>/<k>.jpg`: smooth colour gradients with a few bars and noise, two classes, landscape and
    portrait, JPEG quality 90; rewritten every run (they are few and small)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(n):
        h, w = (72, 96) if k % 3 else (96, 72)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, 3)
        rgb = np.stack([127 + 100 * np.sin(x / w * 3 + y / h * 2 + p) for p in phase], -1)
        for _ in range(3):
            y0, x0 = rng.integers(0, h - 10), rng.integers(0, w - 10)
            rgb[y0:y0 + 10, x0:x0 + rng.integers(5, w - x0)] = rng.uniform(0, 255, 3)
        rgb += rng.normal(0, 6, rgb.shape)
        out = folder / f"class{k % 2}" / f"{k:03d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(out, quality=90)
    return folder


def _context(device: str):
    import torch

    from byolfast.pipeline.contract import LoaderContext

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32   # the training dtype of a bf16 GPU run
    return LoaderContext(device=dev, dtype=dtype, batch_size=BATCH, seed=0)


def first_batch(loader, ctx) -> dict:
    """Draw one batch, check it against the contract; what it looks like."""
    import torch

    from byolfast.pipeline.contract import check_batch

    t0 = time.perf_counter()
    batch = next(iter(loader))
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - t0
    check_batch(batch, ctx, IMAGE_SIZE)
    v1, v2 = batch.view1.float(), batch.view2.float()
    if not (torch.isfinite(v1).all() and torch.isfinite(v2).all()):
        raise AssertionError("the views hold NaN or infinite values")
    differ = (v1 - v2).abs().mean().item()
    if differ < 0.05:
        raise AssertionError(f"the two views are nearly the same (mean |view1 - view2| {differ:.4f})")
    return {"first_batch_s": round(seconds, 3), "view_device": str(batch.view1.device),
            "view_dtype": str(batch.view1.dtype), "view_shape": list(batch.view1.shape),
            "view1_mean": round(v1.mean().item(), 4), "view1_std": round(v1.std().item(), 4),
            "mean_abs_view_difference": round(differ, 4), "stats": _scalars(loader.stats())}


def _scalars(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool)) or v is None}


def dali_batch(folder: Path, device: str) -> dict:
    from byolfast.pipeline.config import DaliConfig, DataConfig
    from byolfast.pipeline.backends.dali.loader import DaliTwoViewLoader

    ctx = _context(device)
    cfg = DataConfig(backend="dali", path=str(folder), image_size=IMAGE_SIZE,
                     dali=DaliConfig(num_threads=2, decoder="mixed" if ctx.device.type == "cuda" else "cpu"))
    loader = DaliTwoViewLoader(cfg, ctx)
    try:
        if ctx.device.type == "cuda" and loader.decoder != "mixed":
            raise AssertionError(f"DALI fell back to the {loader.decoder!r} decoder on {device}")
        return {"decoder": loader.decoder, **first_batch(loader, ctx)}
    finally:
        loader.close()


def ffcv_batch(folder: Path, work: Path, device: str) -> dict:
    from byolfast.pipeline.config import DataConfig
    from byolfast.pipeline.convert import convert_dataset
    from byolfast.pipeline.backends.ffcv.loader import FfcvTwoViewLoader

    t0 = time.perf_counter()
    out = work / "converted"
    convert_dataset(str(folder), str(out), ("ffcv",), workers=1, max_side=96, progress=False, overwrite=True)
    convert_s = time.perf_counter() - t0
    ctx = _context(device)
    loader = FfcvTwoViewLoader(DataConfig(backend="ffcv", path=str(out), image_size=IMAGE_SIZE, num_workers=2), ctx)
    try:
        return {"convert_s": round(convert_s, 3), **first_batch(loader, ctx)}
    finally:
        loader.close()


def run_checks(device: str, work: Path, out: Optional[Path]) -> list[dict]:
    """Every check in order; the records (written to `out` after each one)."""
    records: list[dict] = []

    def save(complete: bool) -> None:
        if out is not None:
            write_json(out, {"device": device, "complete": complete, "checks": records})

    def check(name: str, fn: Callable[[], dict], needs: Sequence[str] = ()) -> None:
        rec: dict = {"name": name}
        blocked = [r for r in records if r["name"] in needs and r["status"] != "ok"]
        t0 = time.perf_counter()
        if blocked:
            rec.update(status=blocked[0]["status"], error=f"not run: {blocked[0]['name']} is {blocked[0]['status']}")
        else:
            try:
                rec.update(fn())
                rec["status"] = "ok"
            except Missing as e:
                rec.update(status="missing", **error_fields(e))
            except Exception as e:  # every failure is a record with its traceback; the next checks still run
                rec.update(status="failed", **error_fields(e))
                log.error("%s failed", name, exc_info=True)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        records.append(rec)
        log.info("%s: %s (%.1f s)%s", name, rec["status"], rec["seconds"],
                 f": {rec['error']}" if rec.get("error") else "")
        save(complete=False)

    images = work / "folder"
    check("versions", lambda: versions(device))
    check("dali_import", lambda: import_package("dali"))
    check("ffcv_import", lambda: import_package("ffcv"))
    check("images", lambda: {"folder": str(write_images(images)), "count": IMAGES})
    check("dali_batch", lambda: dali_batch(images, device), needs=("versions", "dali_import", "images"))
    check("ffcv_batch", lambda: ffcv_batch(images, work, device), needs=("versions", "ffcv_import", "images"))
    save(complete=True)
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m byolfast.benchmarks.smoke", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="JSON file of the checks")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (a rehearsal)")
    p.add_argument("--work", type=Path, default=Path("/tmp/byol-smoke"), help="folder for the images and the beton")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    records = run_checks(args.device, args.work, args.out)
    for r in records:
        print(f"{r['name']:<12} {r['status']:<8} {r['seconds']:7.1f} s  {r.get('error') or r.get('version') or ''}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
