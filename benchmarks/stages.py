"""`byol bench --what stages`: CPU milliseconds per image of each stage of each backend's CPU path.

Each backend is timed on the same benchmark JPEGs, both views, one thread, and reports its own stages in the order
its loader runs them; every stage also belongs to one of `GROUPS` (decode, crop, colour, blur, normalise, other),
so backends can be compared where their stages are cut differently:
  - torch (`torch_stage_ms`): the loader's own `TwoViewFolderDataset.__getitem__` with each transform that
    `build_view_transform` makes wrapped in a timer, and `load_rgb` (PIL's decode) wrapped too; `other` is the rest
    of the sample (seeding, the RNG fork);
  - ffcv (`benchmarks.ffcv_stages`): FFCV's decode and crop primitives and the loader's CPU colour path;
  - dali (`dali_stage_ms`): one small pipeline per stage over the previous stage's outputs (DALI has no per-operator
    timing of its own for the dynamic executor): the decode (`fn.decoders.image`, the loader's path when
    `data.dali.random_crop_decoder` is off), the crop, then `augment_view` with all its optional ops off
    (`normalise`: the draws, the flip and the normalisation) and with one group switched on at a time (`colour`,
    `blur`, `solarize`: the difference, per repeat, to the all-off graph, floored at 0). The crop is the loader's:
    with `data.dali.cpu_kernels` (the default) the numba operator cutting and resizing the window with every other
    op off, less the all-off pass; without, `crop_window` + `resize_window` (DALI's `fn.resize`).
Thread CPU time for torch and ffcv (they run in the calling thread); process CPU time for DALI (its executor and
worker threads do the work). CPU time, not wall time, so other jobs on a shared machine do not count: the table says
what a loader's CPU path costs, not how fast it runs with several workers. On a GPU, parts of these paths move to the
device (FFCV's colour, DALI's `mixed` decode); this table is still the CPU path.
A backend that cannot run here is reported as skipped, with the reason (`skipped`), not as a failure.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from byolfast.benchmarks import bench_data, common
from byolfast.pipeline.config import DataConfig

log = logging.getLogger(__name__)

GROUPS = ("decode", "crop", "colour", "blur", "normalise", "other")
STAGE_GROUPS = {
    "decode": "decode", "crop": "crop", "crop_flip": "crop", "flip": "crop",
    "to_float": "colour", "jitter": "colour", "grayscale": "colour", "colour": "colour",
    "blur": "blur", "solarize": "normalise", "normalise": "normalise",
    "hand_over": "other", "augment_other": "other", "other": "other",
}
TORCH_STAGES = ("decode", "crop_flip", "to_float", "jitter", "grayscale", "blur", "solarize", "normalise", "other")
DALI_STAGES = ("decode", "crop", "colour", "blur", "solarize", "normalise")


# --- timing helpers ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def timed_calls(module, name: str, seconds: dict, stage: str) -> Iterator[None]:
    """Add the thread CPU time of every call of `module.name` to `seconds[stage]` while the block runs."""
    fn = getattr(module, name)
    setattr(module, name, TimedCall(fn, stage, seconds))
    try:
        yield
    finally:
        setattr(module, name, fn)


class TimedCall:
    """`fn`, adding the thread CPU time of each call to `seconds[stage]`."""

    def __init__(self, fn: Callable, stage: str, seconds: dict):
        self.fn, self.stage, self.seconds = fn, stage, seconds

    def __call__(self, *args, **kwargs):
        t = time.thread_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds[self.stage] += time.thread_time() - t


def clock(seconds: dict, stage: str, fn: Callable, *args) -> None:
    """Call `fn(*args)`, adding its thread CPU time to `seconds[stage]`."""
    t = time.thread_time()
    fn(*args)
    seconds[stage] += time.thread_time() - t


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread while the block runs: the kernels then run in the calling thread, the one the clock reads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def median_ms(one_pass: Callable[[], dict], stages: Sequence[str], images: int, repeats: int) -> dict[str, float]:
    """ms per image of each stage (and `total`): the median over `repeats` calls of `one_pass` (seconds per stage for
    all `images`), after one untimed call (numba compiles, allocators grow, DALI warms up on first use)."""
    one_pass()
    passes = [one_pass() for _ in range(max(1, repeats))]
    ms = {s: 1000 * statistics.median(p[s] for p in passes) / images for s in stages}
    ms["total"] = sum(ms.values())
    return ms


# --- torch: the torchvision / PIL path -----------------------------------------------------------------------------
def _torch_stage(transform) -> str:
    """The stage of one transform of `build_view_transform`; a transform not named here is an error, so a change of
    the view pipeline cannot be timed under a wrong name."""
    from torchvision.transforms import v2

    if isinstance(transform, (v2.RandomResizedCrop, v2.RandomHorizontalFlip)):
        return "crop_flip"
    if isinstance(transform, v2.RandomApply):
        return "blur" if any(isinstance(t, v2.GaussianBlur) for t in transform.transforms) else "jitter"
    for kind, stage in ((v2.ToDtype, "to_float"), (v2.RandomGrayscale, "grayscale"), (v2.RandomSolarize, "solarize"),
                        (v2.Normalize, "normalise")):
        if isinstance(transform, kind):
            return stage
    raise ValueError(f"no stage for {type(transform).__name__}: name it in benchmarks.stages._torch_stage")


def torch_stage_ms(cfg: DataConfig, files: Sequence[Path], *, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """CPU ms per image of each of `TORCH_STAGES` (and `total`) of the torch backend's samples of `files`, both
    views, at `cfg.image_size` with `cfg.augment`: the loader's own dataset, its decode and transforms timed."""
    from torchvision.transforms import v2

    from byolfast.pipeline.backends.torch import loader as torch_loader
    from byolfast.pipeline.contract import DataError

    seconds = dict.fromkeys(TORCH_STAGES, 0.0)
    aug = cfg.augment
    views = []
    for spec in (aug.view1, aug.view2):
        built = torch_loader.build_view_transform(spec, cfg.image_size, aug.mean, aug.std, aug.color_ops)
        views.append(v2.Compose([TimedCall(t, _torch_stage(t), seconds) for t in built.transforms]))
    dataset = torch_loader.TwoViewFolderDataset([(str(f), 0) for f in files], (views[0], views[1]), seed)

    def one_pass() -> dict[str, float]:
        seconds.update(dict.fromkeys(TORCH_STAGES, 0.0))
        whole = 0.0
        with timed_calls(torch_loader, "load_rgb", seconds, "decode"):
            for i in range(len(files)):
                t = time.thread_time()
                sample = dataset[(0, i)]
                whole += time.thread_time() - t
                if sample.error:
                    raise DataError(sample.error)
        out = dict(seconds)
        out["other"] = max(0.0, whole - sum(v for k, v in seconds.items() if k != "other"))
        return out

    with one_torch_thread():
        return median_ms(one_pass, TORCH_STAGES, len(files), repeats)


# --- dali: one small pipeline per stage ----------------------------------------------------------------------------
def _dali_pipe(graph: Callable, inputs: Sequence[list], layout: str | None, seed: int):
    """A built one-thread CPU pipeline of `graph` over fixed batches (`inputs`, one list of arrays per input)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(enable_conditionals=True)
    def pipe():
        # a source function per input; `no_copy`: the arrays stay alive here, so feeding them costs no copy
        nodes = [fn.external_source(source=(lambda b: (lambda: b))(batch), batch=True, no_copy=True, layout=layout)
                 for batch in inputs]
        return graph(*nodes)

    built = pipe(batch_size=len(inputs[0]), num_threads=1, device_id=None, seed=seed, prefetch_queue_depth=1,
                 exec_dynamic=True)
    built.build()
    return built


def _arrays(outputs) -> list[list[np.ndarray]]:
    return [[np.array(t) for t in out] for out in outputs]


def dali_stage_ms(cfg: DataConfig, files: Sequence[Path], *, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """CPU ms per image of each of `DALI_STAGES` (and `total`) of the DALI backend's CPU path over `files`, both
    views, at `cfg.image_size` with `cfg.augment` (colour with `data.dali.cpu_kernels` as configured, one thread)."""
    from nvidia.dali import fn, types

    from byolfast.pipeline.dali_augment import augment_view, crop_window, resize_window

    aug, size = cfg.augment, cfg.image_size
    specs = (aug.view1, aug.view2)
    jpegs = [np.fromfile(f, dtype=np.uint8) for f in files]
    decode = _dali_pipe(lambda x: fn.decoders.image(x, device="cpu", output_type=types.RGB), [jpegs], None, seed)
    decoded = _arrays(decode.run())[0]

    def crop(images):
        shapes = images.shape(dtype=types.INT64)
        return tuple(resize_window(images, *crop_window(shapes, spec), size) for spec in specs)

    crop_pipe = _dali_pipe(crop, [decoded], "HWC", seed)
    crops = _arrays(crop_pipe.run())
    off = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    kernel = bool(cfg.dali.cpu_kernels)

    def crop_in_kernel(images):   # the loader's CPU path: the crop inside the numba operator, every other op off
        shapes = images.shape(dtype=types.INT64)
        return tuple(augment_view(images, dataclasses.replace(s, **off), size, aug.mean, aug.std, cpu_threads=1,
                                  color_ops=aug.color_ops, window=crop_window(shapes, s)) for s in specs)
    switched_on = {"normalise": {}, "colour": {"jitter_p": None, "grayscale_p": None}, "blur": {"blur_p": None},
                   "solarize": {"solarize_p": None}}

    def augment(on: dict) -> Callable:
        views = [dataclasses.replace(s, **{**off, **{k: getattr(s, k) for k in on}}) for s in specs]
        return lambda *images: tuple(augment_view(x, v, size, aug.mean, aug.std, cpu_threads=int(cfg.dali.cpu_kernels),
                                                  color_ops=aug.color_ops) for x, v in zip(images, views))

    pipes = {"decode": decode, "crop": _dali_pipe(crop_in_kernel, [decoded], "HWC", seed) if kernel else crop_pipe,
             **{stage: _dali_pipe(augment(on), crops, "HWC", seed) for stage, on in switched_on.items()}}

    def one_pass() -> dict[str, float]:
        seconds = {}
        for stage, pipe in pipes.items():
            t = time.process_time()
            pipe.run()
            seconds[stage] = time.process_time() - t
        for stage in ("colour", "blur", "solarize") + (("crop",) if kernel else ()):
            # the op's graph less the all-off graph of the same pass
            seconds[stage] = max(0.0, seconds[stage] - seconds["normalise"])
        return seconds

    with one_torch_thread():   # DALI's python_function (the CPU colour kernels) reads torch's thread count
        return median_ms(one_pass, DALI_STAGES, len(files), repeats)


# --- the bench part ------------------------------------------------------------------------------------------------
def _ffcv_stage_ms(cfg: DataConfig, folder: Path, images: int, batch_size: int, repeats: int,
                   seed: int) -> dict[str, float]:
    from byolfast.benchmarks.ffcv_stages import ffcv_stage_ms

    fcfg = dataclasses.replace(cfg, backend="ffcv", path=bench_data.backend_path(folder, "ffcv"))
    return ffcv_stage_ms(fcfg, min(batch_size, images), max_images=images, repeats=repeats, seed=seed)


def _jpeg_files(folder: Path, images: int) -> list[Path]:
    return sorted(folder.glob("*/*.jpg"))[:images]


# backend -> (cfg, folder of JPEGs, images, batch size, repeats, seed) -> ms per image of each stage, and `total`
STAGE_TIMERS: dict[str, Callable[..., dict[str, float]]] = {
    "dali": lambda cfg, folder, images, batch, repeats, seed: dali_stage_ms(
        cfg, _jpeg_files(folder, images), repeats=repeats, seed=seed),
    "ffcv": _ffcv_stage_ms,
    "torch": lambda cfg, folder, images, batch, repeats, seed: torch_stage_ms(
        cfg, _jpeg_files(folder, images), repeats=repeats, seed=seed),
}


def stage_fields(ms: dict[str, float]) -> dict:
    """The record fields of one backend's stage times: ms per image per stage, each stage's share of the total, the
    same summed per group (`GROUPS`), and a note naming the largest stage."""
    stages = {k: v for k, v in ms.items() if k != "total"}
    total = sum(stages.values())
    share = {k: (v / total if total > 0 else 0.0) for k, v in stages.items()}
    groups = {g: sum(v for k, v in stages.items() if STAGE_GROUPS.get(k, "other") == g) for g in GROUPS}
    top = max(stages, key=stages.get) if stages else "-"
    return {"stage_ms": stages, "stage_share": share, "group_ms": groups, "total_ms_per_image": total,
            "note": f"{total:.3g} CPU ms/image, one thread; largest: {top} {100 * share.get(top, 0.0):.0f}%"}


def bench_stages(cfg, device: torch.device, folder: Path | None, problem: BaseException | None, *,
                 backends: Sequence[str], images: int, repeats: int) -> Iterator[dict]:
    """One `stages` record per backend: `stage_fields` of its CPU path on the first `images` benchmark JPEGs, or
    `skipped` (a package missing: the reason) or `error` (anything else)."""
    for backend in backends:
        # the CPU path whatever the run's device: the record says cpu, and which device the run was for
        rec = common.record("stages", "backend", backend, cfg, torch.device("cpu"), run_device=device.type,
                            images=images, repeats=repeats, threads=1)
        try:
            if folder is None:
                raise RuntimeError(f"no benchmark images ({type(problem).__name__}: {problem})") from problem
            ms = STAGE_TIMERS[backend](cfg.data, folder, images, cfg.train.batch_size, repeats, cfg.train.seed)
            rec.update(stage_fields(ms))
        except Exception as err:  # one backend failing must not stop the others
            missing = common.missing_module(err)
            if missing:
                rec.update(skipped=f"{missing} is not installed", note=f"skipped: {missing} is not installed")
            else:
                log.warning("stages %s: %s: %s", backend, type(err).__name__, err, exc_info=True)
                rec.update(common.error_fields(err))
        log.info("stages %s: %s", backend, rec.get("note") or rec.get("error"))
        yield rec


def stage_table(records: Sequence[dict]) -> str:
    """Per backend: stage, its group, CPU ms per image, share of the backend's total, then the shares per group (the
    line to compare backends by); a skipped or failed backend in one line with its reason."""
    lines = []
    for r in records:
        if r.get("what") != "stages":
            continue
        head = f"stages {r['backend']}"
        if "stage_ms" not in r:
            lines.append(f"{head}: {r.get('note') or r.get('error')}")
            continue
        lines += [f"{head} (CPU ms per image, both views, {r.get('images')} images at {r.get('resolution')} px, "
                  "one thread)", f"  {'stage':<14} {'group':<10} {'ms/image':>9} {'share':>7}"]
        for stage, ms in r["stage_ms"].items():
            lines.append(f"  {stage:<14} {STAGE_GROUPS.get(stage, 'other'):<10} {ms:9.3f} "
                         f"{100 * r['stage_share'][stage]:6.1f}%")
        lines.append(f"  {'total':<14} {'':<10} {r['total_ms_per_image']:9.3f} {100.0:6.1f}%")
        total = r["total_ms_per_image"] or 1.0
        lines.append("  by group: " + ", ".join(f"{g} {100 * ms / total:.0f}%" for g, ms in r["group_ms"].items()))
    return "\n".join(lines)
