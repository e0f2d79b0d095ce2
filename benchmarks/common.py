"""What every benchmark shares: device-synchronised timing, peak memory, matmul rate, images, JSON/PNG output.

The environment recorded beside the numbers (device, driver, versions) is in `benchmarks.environment`.

Timing follows the usual rules: warm up first (cuDNN autotuning, allocator growth, lazy initialisation), synchronise
the device before reading the clock, repeat the timed block and keep the median. The only host-device syncs are the
ones around the clock.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_repeats(fn: Callable[[], object], device: torch.device, *, warmup: int, iters: int,
                 repeats: int) -> list[float]:
    """Seconds per call of `fn`, one value per repeat of `iters` calls, after `warmup` calls.

    The device is synchronised before each repeat starts and after it ends, never inside.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for _ in range(max(1, iters)):
            fn()
        sync(device)
        out.append((time.perf_counter() - t0) / max(1, iters))
    return out


def host_seconds_per_call(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Seconds the host spends issuing one call of `fn` (no synchronisation inside the timed calls). On a GPU this is
    the launch cost; when it is close to the synchronised time per call, the call is bound by the host, not by the
    device."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(max(1, iters)):
        fn()
    seconds = (time.perf_counter() - t0) / max(1, iters)
    sync(device)
    return seconds


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def time_epochs(loader, consume: Callable, device: torch.device, *, warmup: int, steps: int, repeats: int,
                warm_each_repeat: bool = True, budget_s: float = 0.0) -> tuple[list[float], float]:
    """Seconds per batch of `consume(batch)` for each repeat (a new epoch each), and the first batch's latency.

    Each repeat starts an epoch, consumes `warmup` batches plus the loader's `read_ahead` untimed (pipeline start;
    the batches its queues prepared before anyone counted: timed, they would make a slow loader look fast), then times
    `steps` batches. An epoch too short for that is an error. `warm_each_repeat=False` warms up in the first repeat
    only (for the synthetic loader, which has no queues).
    `budget_s` > 0 bounds the timed batches of all repeats together to about that many seconds, judged by the warm-up
    batches (at least one timed batch, fewer repeats first): a slow variant (bf16 on a CPU without bf16 units) then
    costs seconds, not minutes. The number of repeats actually run is the length of the returned list.
    """
    per_batch, first_latency = [], math.nan
    ahead = int(getattr(loader, "read_ahead", 0))
    r = 0
    while r < repeats:
        w = (warmup if r == 0 or warm_each_repeat else 0) + (ahead if r == 0 or warm_each_repeat else 0)
        n = min(steps, len(loader) - w)
        if n < min(steps, 2):
            from byolfast.pipeline.contract import DataError
            raise DataError(f"{len(loader)} batches per epoch leave {max(n, 0)} to time after {w} warm-up batches "
                            f"({ahead} of them the loader's read-ahead): raise --images, or lower --warmup or "
                            "the batch size")
        loader.set_epoch(r)
        it = iter(loader)
        judged = False
        try:
            for i in range(w):
                t_batch = time.perf_counter()
                consume(next(it))
                sync(device)
                batch_s = time.perf_counter() - t_batch
                if r == 0 and i == 0:
                    first_latency = batch_s
                # judged after the second batch at the earliest: the first one pays for start-up (FFCV compiles)
                if (r == 0 and budget_s > 0 and not judged
                        and (i == w - 1 or (i >= 1 and 2 * batch_s > budget_s))):
                    judged = True
                    affordable = max(1, int(budget_s / batch_s))
                    if affordable < repeats * n:   # the budget binds: fewer repeats and batches, a short warm-up
                        repeats = max(1, min(repeats, affordable // 2))
                        steps = n = max(1, min(n, affordable // repeats))
                        warmup = min(warmup, 1)
                    if i + 1 >= ahead:   # the rest of the warm-up may go, never the read-ahead
                        break
            t0 = time.perf_counter()
            for _ in range(n):
                consume(next(it))
            sync(device)
            per_batch.append((time.perf_counter() - t0) / n)
        finally:
            close = getattr(it, "close", None)   # leave the epoch: stops its workers' read-ahead
            if close is not None:
                close()
        r += 1
    return per_batch, first_latency


# --- records -------------------------------------------------------------------------------------------------------
def record(what: str, name_key: str, name: str, cfg, device: torch.device, **fields) -> dict:
    """One benchmark record: what was measured, its name and the run's sizes; `fields` add or override."""
    rec = {"what": what, name_key: name, "device": device.type, "batch_size": cfg.train.batch_size,
           "resolution": cfg.data.image_size, "images_per_sec": None, "peak_mem_mb": None,
           "peak_mem_kind": memory_kind(device)}
    rec.update(fields)
    return rec


# --- configuration -------------------------------------------------------------------------------------------------
def _paths(config: str | Sequence[str] | None) -> list[str]:
    """`--config` given once (a path), several times (a list) or not at all."""
    return [config] if isinstance(config, str) else list(config or [])


def requested_device(overrides: Sequence[str], config: str | Sequence[str] | None = None) -> torch.device:
    """The device a run with these YAML files and overrides trains on (`train.device`, default `auto`), for
    choosing default sizes."""
    from byolfast.train.distributed import resolve_device

    name = "auto"
    for path in _paths(config):   # a later file overrides an earlier one
        loaded = _yaml_mapping(path)
        if isinstance(loaded.get("train"), dict) and loaded["train"].get("device"):
            name = str(loaded["train"]["device"])
    for text in overrides:
        if text.split("=", 1)[0].strip() == "train.device" and "=" in text:
            name = text.split("=", 1)[1].strip() or "auto"
    return resolve_device(name)


def default_overrides(device: torch.device) -> list[str]:
    """Sizes for a benchmark that finishes in minutes: ResNet-18 at 64 px on CPUs, ResNet-50 at 224 px on GPUs;
    loader threads = the cores this process may use. (`train.precision=auto` picks bf16 only where it is native.)"""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    shared = [f"data.num_workers={cpus}", f"data.dali.num_threads={cpus}"]
    if device.type == "cuda":
        return ["model.arch=resnet50", "data.image_size=224", "train.batch_size=128", *shared]
    return ["model.arch=resnet18", "data.image_size=64", "train.batch_size=32", "data.dali.decoder=cpu", *shared]


def _yaml_mapping(path: str | None) -> dict:
    """The YAML file's top-level mapping; {} when there is none or it does not parse (`load_config` reports that)."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text()) if path and Path(path).is_file() else None
    except yaml.YAMLError:
        loaded = None
    return loaded if isinstance(loaded, dict) else {}


def _flat_keys(data: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        keys.add(key)
        if isinstance(v, dict):
            keys |= _flat_keys(v, key)
    return keys


def load_bench_config(config: str | Sequence[str] | None, overrides: Sequence[str], defaults: Sequence[str] = ()):
    """`byol train`'s config loading (one or several `--config` files, later ones overriding earlier ones, then
    the overrides) with `defaults` underneath: a default applies only to a key that neither a YAML file nor an
    override sets. Raises `ConfigError` like `byol train` does."""
    from byolfast.train.cli import load_configs

    paths = _paths(config)
    taken = {o.split("=", 1)[0].strip() for o in overrides}.union(*(_flat_keys(_yaml_mapping(p)) for p in paths))
    kept = [d for d in defaults if d.split("=", 1)[0] not in taken]
    return load_configs(paths, [*kept, *overrides])


# --- memory --------------------------------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's, or the process's peak RSS (Linux `clear_refs`, where allowed)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current RSS
    except OSError:        # not Linux, or not permitted: the peak then covers the whole process
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since `reset_peak_memory`: CUDA `max_memory_allocated`, else the process's peak RSS (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def memory_kind(device: torch.device) -> str:
    return "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"


def total_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**20
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return math.nan


def free_memory(device: torch.device) -> None:
    """Return cached blocks between variants, so one variant's peak does not include another's cache."""
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- rates ---------------------------------------------------------------------------------------------------------
def matmul_flops_per_sec(device: torch.device, n: int, dtype: torch.dtype = torch.bfloat16, iters: int = 0) -> float:
    """Measured rate of an n x n x n matmul (2 n^3 flops) in `dtype`: the device's practical peak for dense maths."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    flops = 2.0 * n ** 3
    if iters <= 0:   # about 0.2 s of work on a fast device, at least a few calls
        t = median(time_repeats(lambda: torch.mm(a, b, out=c), device, warmup=1, iters=1, repeats=1))
        iters = int(min(50, max(3, 0.2 / max(t, 1e-6))))
    secs = median(time_repeats(lambda: torch.mm(a, b, out=c), device, warmup=2, iters=iters, repeats=3))
    return flops / secs


def stream_bytes_per_sec(device: torch.device, numel: int, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Measured memory bandwidth over `numel`-element tensors, two ways.

    `copy`: `dst.copy_(src)`, counted as 2 x numel elements moved. `read2_write1`: the in-place `a.add_(b)`,
    counted as 3 x numel, the traffic pattern of a lerp. On CPUs a copy's stores also read the destination
    (write-allocate), so the copy understates what an in-place update can reach; both are reported.
    """
    src = torch.rand(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    nbytes = numel * src.element_size()
    copy_s = median(time_repeats(lambda: dst.copy_(src), device, warmup=2, iters=5, repeats=5))
    add_s = median(time_repeats(lambda: dst.add_(src), device, warmup=2, iters=5, repeats=5))
    return {"copy": 2 * nbytes / copy_s, "read2_write1": 3 * nbytes / add_s}


def count_flops(fn: Callable[[], object]) -> int:
    """Flops of one call of `fn` (forward and backward matmuls/convolutions, as `FlopCounterMode` counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def slug(text: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `nvidia-h100-80gb-hbm3`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def error_fields(err: BaseException) -> dict:
    """What a failed record keeps: `error` (`Type: message`, for tables), `traceback` (the whole text, chained causes
    included: on a machine used once, the message alone rarely says where it failed) and, when the failure comes from a
    package that is not installed, `missing_module` (its name)."""
    fields = {"error": f"{type(err).__name__}: {err}", "traceback": "".join(traceback.format_exception(err))}
    missing = missing_module(err)
    if missing:
        fields["missing_module"] = missing
    return fields


def missing_module(err: BaseException | None) -> str | None:
    """The module whose import failed for want of it, if `err` is (or was raised from) a ModuleNotFoundError."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ModuleNotFoundError):
            return err.name
        err = err.__cause__ or err.__context__
    return None


def write_json(path: str | Path, data: dict) -> Path:
    """Write `data` as indented JSON, atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
    return path


def write_bar_chart(path: str | Path, records: Sequence[dict], title: str) -> Path | None:
    """One horizontal bar panel per kind of benchmark (`what`); failed records are left out."""
    from byolfast.benchmarks.report import record_label, record_value

    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no chart written (the JSON has every number)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for r in records:
        if not r.get("error") and not math.isnan(record_value(r)[0]):
            groups.setdefault(str(r.get("what")), []).append(r)
    if not groups:
        return None
    sizes = [len(g) + 1 for g in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 0.8 + 0.4 * sum(sizes)), squeeze=False,
                             gridspec_kw={"height_ratios": sizes})
    for ax, (what, recs) in zip(axes[:, 0], groups.items()):
        labels = [record_label(r) for r in recs]
        values = [record_value(r)[0] for r in recs]
        bars = ax.barh(range(len(recs)), values, color="tab:blue")
        ax.set_yticks(range(len(recs)), labels)
        ax.invert_yaxis()
        ax.set_title(what, loc="left", fontsize=10)
        ax.set_xlabel(record_value(recs[0])[1])
        ax.bar_label(bars, fmt="%.3g", fontsize=8, padding=2)
        ax.margins(x=0.15)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
