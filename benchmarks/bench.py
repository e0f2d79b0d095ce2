"""`byol bench`: images/sec of the loaders alone, the model alone and both together; the weight updates (EMA, LARS);
where each loader's CPU time goes.

    byol bench --what loader|model|e2e|ema|optim|stages|all --out runs/bench/bench.json [--config FILE]
               [section.key=value ...]

- loader: two-view images/s of each backend (dali, ffcv, torch) on the same real JPEGs (~320x240 crops of
  scikit-image's photographs, built once under `--data`, converted with `byol convert` into shards and a beton, kept
  byte for byte) with the same augmentation spec; plus the batched device colour augmentation alone.
- model: the trainer's own BYOL step (`Trainer.train_step`: online fwd+bwd on both views, target fwd, LARS, EMA) on
  the synthetic loader, per variant (precision, channels-last, fused vs loop EMA, torch.compile with `--compile`);
  flops per image and the achieved fraction of a bf16 matmul's measured rate.
- e2e: the same steps fed by each real backend, with the ratio to model-only measured in the same run
  (1.0: the input pipeline is completely hidden).
- ema: milliseconds per target update, fused (`_foreach_lerp_`) and per-parameter loop, against the time a copy
  needs to move the same bytes (lerp reads two tensors and writes one).
- optim: milliseconds per LARS step of the same model on random gradients, the fused step against the per-tensor
  reference (`lars_step_per_tensor_`: the trust ratios as a list of 0-d tensors), timed alternately.
- stages: CPU ms per image of each stage (decode, crop, colour, blur, normalise, ...) of each backend's CPU path on
  the first `--stage-images` benchmark JPEGs, one thread, printed as a table per backend (`benchmarks.stages`).
Timing: warm-up batches/steps first, then `--steps` timed ones per repeat (each repeat a new epoch for loaders), the
device synchronised around the clock, the median over `--repeats`. images/s counts images (each gives two views).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from byolfast.benchmarks import common, environment
from byolfast.benchmarks.bench_update import bench_ema, bench_optim
from byolfast.benchmarks.bench_data import PHOTO_SIZE, backend_path, build_bench_images, photo_size
from byolfast.benchmarks.common import time_epochs
from byolfast.benchmarks.report import format_table, hidden_ratio, summary_lines
from byolfast.benchmarks.stages import bench_stages, stage_table
from byolfast.pipeline.registry import BACKENDS, bench_backends

log = logging.getLogger(__name__)

WHATS = ("loader", "model", "e2e", "ema", "optim", "stages")


def _scalar_stats(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool)) or v is None}


# --- loader-only -----------------------------------------------------------------------------------------------------
def bench_loaders(cfg, device: torch.device, args) -> Iterator[dict]:
    """Two-view images/s of each backend on the benchmark images, and of the device colour augmentation alone."""
    from byolfast.pipeline import LoaderContext, build_two_view_loader
    from byolfast.train.runtime import DTYPES, resolve_precision

    folder, problem = _bench_folder(args)
    dtype = DTYPES[resolve_precision(cfg.train.precision, device)]
    ctx = LoaderContext(device=device, dtype=dtype, batch_size=cfg.train.batch_size,
                        seed=cfg.train.seed, channels_last=cfg.model.channels_last)
    for backend in args.backends:
        settings = {"num_workers": cfg.data.num_workers}
        if BACKENDS[backend].settings is not None:   # its own section, e.g. data.dali's threads and decoder
            settings[backend] = dataclasses.asdict(getattr(cfg.data, backend))
        rec = common.record("loader", "backend", backend, cfg, device, **settings)
        loader = None
        try:
            if folder is None:
                raise RuntimeError(f"no benchmark images ({type(problem).__name__}: {problem})") from problem
            dcfg = _with(cfg.data, backend=backend, path=backend_path(folder, backend))
            common.free_memory(device)
            common.reset_peak_memory(device)
            loader = build_two_view_loader(dcfg, ctx)
            secs, first = time_epochs(loader, lambda b: None, device, warmup=args.loader_warmup,
                                      steps=args.loader_steps, repeats=args.repeats)
            rec.update(images_per_sec=ctx.batch_size / common.median(secs), first_batch_s=first,
                       runs_images_per_sec=[ctx.batch_size / s for s in secs],
                       peak_mem_mb=common.peak_memory_mb(device), stats=_scalar_stats(loader.stats()))
        except Exception as err:  # one backend failing (not installed, no GPU decoder) must not stop the others
            log.warning("loader %s: %s: %s", backend, type(err).__name__, err, exc_info=True)
            rec.update(common.error_fields(err))
        finally:
            if loader is not None:
                loader.close()
        log.info("loader %s: %s", backend, rec.get("images_per_sec") or rec.get("error"))
        yield rec
    try:
        yield bench_device_augment(cfg, device, folder, args)
    except Exception as err:  # reported as a record like a failing backend
        log.warning("device augmentation: %s: %s", type(err).__name__, err, exc_info=True)
        yield common.record("augment", "backend", "device_augment", cfg, device, **common.error_fields(err))


def _bench_folder(args) -> tuple[Optional[Path], Optional[Exception]]:
    """The benchmark images, or None and why not (e.g. scikit-image missing), so each backend reports it."""
    try:
        return build_bench_images(args.data, args.images, size=tuple(args.photo_size)), None
    except Exception as err:  # reported in every loader's record; the model and EMA parts do not need images
        log.warning("no benchmark images: %s: %s", type(err).__name__, err, exc_info=True)
        return None, err


def _with(section, **changes):
    import copy
    new = copy.deepcopy(section)
    for k, v in changes.items():
        setattr(new, k, v)
    return new


def bench_device_augment(cfg, device: torch.device, folder: Optional[Path], args) -> dict:
    """Both views' batched colour augmentation (jitter, grayscale, blur, solarize, normalise) of uint8 crops of the
    benchmark photographs (random pixels when there are none), already on the device: what the ffcv backend adds
    after its CPU crop."""
    import numpy as np
    from PIL import Image

    from byolfast.pipeline.device_augment import BatchedViewAugment

    size, n = cfg.data.image_size, cfg.train.batch_size
    rec = common.record("augment", "backend", "device_augment", cfg, device)
    files = sorted(folder.glob("*/*.jpg"))[:n] if folder is not None else []
    if files:
        crops = np.stack([np.asarray(Image.open(files[i % len(files)]).convert("RGB").resize((size, size)))
                          for i in range(n)])
    else:
        crops = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        rec["note"] = "random pixels (no photographs available)"
    x = torch.from_numpy(crops).to(device)
    aug = cfg.data.augment
    views = [BatchedViewAugment(spec, aug.mean, aug.std, size, color_ops=aug.color_ops).to(device)
             for spec in (aug.view1, aug.view2)]
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    common.reset_peak_memory(device)
    secs = common.time_repeats(lambda: [v(x, gen) for v in views], device, warmup=args.loader_warmup,
                               iters=args.loader_steps, repeats=args.repeats)
    rec.update(images_per_sec=n / common.median(secs), peak_mem_mb=common.peak_memory_mb(device))
    return rec


# --- model-only and end-to-end ---------------------------------------------------------------------------------------
VARIANT_KINDS = ("default", "precision", "memory_format", "ema", "compile")


def model_variants(cfg, device: torch.device, kinds: Sequence[str] = VARIANT_KINDS,
                   with_compile: bool = False) -> list[tuple[str, list[str], str]]:
    """(name, overrides, ema) per variant: the configured run (`default`), then one change at a time of the `kinds`
    asked for: the other precisions (fp16 only on GPUs), the other memory format, the loop EMA, torch.compile (only
    `with_compile`)."""
    from byolfast.train.runtime import resolve_precision

    base, cl, comp = resolve_precision(cfg.train.precision, device), cfg.model.channels_last, cfg.train.compile
    out = []
    if "default" in kinds:
        out.append((_variant_name(base, cl, "fused", comp), [], "fused"))
    if "precision" in kinds:
        for p in ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else []):
            if p != base:
                out.append((_variant_name(p, cl, "fused", comp), [f"train.precision={p}"], "fused"))
    if "memory_format" in kinds:
        out.append((_variant_name(base, not cl, "fused", comp), [f"model.channels_last={str(not cl).lower()}"],
                    "fused"))
    if "ema" in kinds:
        out.append((_variant_name(base, cl, "loop", comp), [], "loop"))
    if "compile" in kinds and with_compile and not comp:
        out.append((_variant_name(base, cl, "fused", True), ["train.compile=true"], "fused"))
    return out


def _variant_name(precision: str, channels_last: bool, ema: str, compiled: bool) -> str:
    return "+".join([precision, "channels_last" if channels_last else "contiguous"]
                    + (["ema_loop"] if ema == "loop" else []) + (["compile"] if compiled else []))


def run_steps(cfg, device: torch.device, args, ema: str = "fused", flops: bool = False) -> dict:
    """Build a trainer for `cfg`, time its `train_step` with its own loader; the measured fields of a record."""
    from byolfast.train.loop import Trainer

    common.free_memory(device)
    common.reset_peak_memory(device)
    trainer = Trainer(cfg)
    try:
        trainer.model.train()
        train_step, counter = trainer.train_step, {"step": 0}

        def consume(batch) -> None:
            train_step(batch, counter["step"], ema=ema)
            counter["step"] += 1

        fields: dict = {"precision": trainer.precision}
        if flops:   # one extra step, counted, before timing
            loader_it = iter(trainer.loader)
            try:
                batch = next(loader_it)
                fields["flops_per_image"] = common.count_flops(lambda: consume(batch)) / cfg.train.batch_size
            finally:
                getattr(loader_it, "close", lambda: None)()
        secs, first = time_epochs(trainer.loader, consume, device, warmup=args.warmup, steps=args.steps,
                                  repeats=args.repeats, warm_each_repeat=cfg.data.backend != "synthetic",
                                  budget_s=args.budget)
        step_s = common.median(secs)
        fields.update(images_per_sec=cfg.train.batch_size / step_s, step_ms=1000 * step_s, first_step_s=first,
                      runs_images_per_sec=[cfg.train.batch_size / s for s in secs],
                      peak_mem_mb=common.peak_memory_mb(device), loader_stats=_scalar_stats(trainer.loader.stats()))
        return fields
    finally:
        trainer.loader.close()
        del trainer
        common.free_memory(device)


def bench_model(cfg, device: torch.device, args, overrides: list[str],
                matmul_rates: dict[str, float]) -> Iterator[dict]:
    """Model-only images/s per variant on the synthetic loader; flops and the fraction of the measured matmul rates
    (`mfu_bf16`: of the bf16 rate; `fraction_of_peak_matmul`: of the fastest measured dtype)."""
    flops_per_image = None   # counted once, on the first variant that is not compiled (all share the model)
    for name, changes, ema in model_variants(cfg, device, args.variants, args.compile):
        vcfg = _config(args, [*overrides, "data.backend=synthetic", *changes,
                              f"data.synthetic_size={cfg.train.batch_size * (args.warmup + args.steps + 1)}"])
        rec = common.record("model", "variant", name, vcfg, device, channels_last=vcfg.model.channels_last, ema=ema,
                      compile=vcfg.train.compile, arch=vcfg.model.arch, default=not changes and ema == "fused")
        try:
            count = flops_per_image is None and not vcfg.train.compile
            rec.update(run_steps(vcfg, device, args, ema=ema, flops=count))
            flops_per_image = rec.get("flops_per_image", flops_per_image)
        except Exception as err:  # e.g. torch.compile without a C++ compiler: reported, the other variants still run
            log.warning("model %s: %s: %s", name, type(err).__name__, err, exc_info=True)
            rec.update(common.error_fields(err))
        if rec.get("images_per_sec") and flops_per_image:
            achieved = flops_per_image * rec["images_per_sec"]
            rec.update(flops_per_image=flops_per_image, achieved_tflops=achieved / 1e12,
                       # of the bf16 rate where bf16 is native (an emulated rate, below fp32's, would give > 100 %)
                       mfu_bf16=(achieved / matmul_rates["bf16"] if matmul_rates.get("bf16")
                                 and matmul_rates["bf16"] >= matmul_rates.get("fp32", 0.0) else None),
                       fraction_of_peak_matmul=achieved / max(matmul_rates.values()) if matmul_rates else None)
        log.info("model %s: %s", name, rec.get("images_per_sec") or rec.get("error"))
        yield rec


def bench_e2e(cfg, device: torch.device, args, overrides: list[str], model_records: list[dict]) -> Iterator[dict]:
    """The same steps fed by each real backend, with the ratio to the model-only rate of the configured variant."""
    folder, problem = _bench_folder(args)
    default = next((r for r in model_records if r.get("default") and r.get("images_per_sec")), None)
    if default is None:   # measure the model-only reference in this run
        mcfg = _config(args, [*overrides, "data.backend=synthetic",
                              f"data.synthetic_size={cfg.train.batch_size * (args.warmup + args.steps + 1)}"])
        default = common.record("e2e", "backend", "synthetic", mcfg, device, note="model-only reference")
        try:
            default.update(run_steps(mcfg, device, args))
        except Exception as err:  # the backends are still measured; only their ratios are missing
            log.warning("e2e model-only reference: %s: %s", type(err).__name__, err, exc_info=True)
            default.update(common.error_fields(err))
    reference = {**default, "what": "e2e", "backend": "synthetic",
                 "ratio_to_model": 1.0 if default.get("images_per_sec") else None}
    reference.pop("variant", None)
    yield reference
    for backend in args.backends:
        rec = common.record("e2e", "backend", backend, cfg, device)
        try:
            if folder is None:
                raise RuntimeError(f"no benchmark images ({type(problem).__name__}: {problem})") from problem
            bcfg = _config(args, [*overrides, f"data.backend={backend}", f"data.path={backend_path(folder, backend)}"])
            rec.update(run_steps(bcfg, device, args))
            if default.get("images_per_sec"):
                rec["ratio_to_model"] = hidden_ratio(rec["images_per_sec"], default["images_per_sec"])
        except Exception as err:  # one backend failing must not stop the others
            log.warning("e2e %s: %s: %s", backend, type(err).__name__, err, exc_info=True)
            rec.update(common.error_fields(err))
        log.info("e2e %s: %s", backend, rec.get("images_per_sec") or rec.get("error"))
        yield rec


def _config(args, overrides: Sequence[str]):
    return common.load_bench_config(args.config, overrides, args.defaults)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byol bench", description="images/sec: loader-only, model-only, e2e, EMA; "
                                "CPU ms per image of each loader stage")
    p.add_argument("--what", choices=(*WHATS, "all"), default="all")
    p.add_argument("--out", default="runs/bench/bench.json", help="JSON file (the PNG chart is written beside it)")
    p.add_argument("--config", action="append", help="a YAML preset (configs/*.yaml); several: later ones override "
                   "earlier ones, as in byol train")
    p.add_argument("--backends", default=",".join(bench_backends()),
                   help=f"comma-separated loader backends among {', '.join(bench_backends())}")
    p.add_argument("--data", default="data/bench", help="folder for the benchmark images and their conversions")
    p.add_argument("--images", type=int, default=0,
                   help="benchmark images (0: enough per epoch for the warm-up, the loaders' read-ahead and the timed "
                        "batches, at least 384; 384 for --what stages, whose timers read only --stage-images)")
    p.add_argument("--photo-size", type=photo_size, default=PHOTO_SIZE, metavar="WxH",
                   help="size of the benchmark JPEGs (a quarter of them portrait), e.g. 500x375")
    p.add_argument("--warmup", type=int, default=-1, help="untimed model steps (-1: 2 on CPU, 10 on GPU)")
    p.add_argument("--steps", type=int, default=-1, help="timed model steps per repeat (-1: 5 on CPU, 20 on GPU)")
    p.add_argument("--loader-warmup", type=int, default=-1, help="untimed batches per epoch (-1: 2 / 5)")
    p.add_argument("--loader-steps", type=int, default=-1, help="timed batches per repeat (-1: 8 / 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--budget", type=float, default=-1,
                   help="seconds of timed steps per model/e2e run, fewer when slower (-1: 15 on CPU, 0: off)")
    p.add_argument("--stage-images", type=int, default=64, help="benchmark JPEGs each backend's stages are timed on")
    p.add_argument("--ema-iters", type=int, default=10, help="EMA updates per timed repeat")
    p.add_argument("--optim-iters", type=int, default=5, help="LARS steps per timed repeat")
    p.add_argument("--matmul-size", type=int, default=0, help="n of the n^3 bf16 matmul (0: 8192 GPU, 1024 CPU)")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile variant (slow to compile)")
    p.add_argument("--variants", default=",".join(VARIANT_KINDS),
                   help=f"model variants to time, comma-separated among {', '.join(VARIANT_KINDS)}")
    p.add_argument("--no-defaults", action="store_true",
                   help="do not apply the small default sizes (ResNet-18/64 px on CPU, ResNet-50/224 px on GPU)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def _resolve_args(args, device: torch.device) -> None:
    gpu = device.type == "cuda"
    for name, cpu_value, gpu_value in (("warmup", 2, 10), ("steps", 5, 20), ("loader_warmup", 2, 5),
                                       ("loader_steps", 8, 10)):
        if getattr(args, name) < 0:
            setattr(args, name, gpu_value if gpu else cpu_value)
    args.matmul_size = args.matmul_size or (8192 if gpu else 1024)
    if args.budget < 0:
        args.budget = 0.0 if gpu else 15.0
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [b for b in args.backends if b not in bench_backends()] + [v for v in args.variants
                                                                     if v not in VARIANT_KINDS]
    if bad or args.repeats < 1 or args.steps < 1 or args.stage_images < 1:
        from byolfast.train.config import ConfigError
        raise ConfigError(f"--backends takes {', '.join(bench_backends())}, --variants {', '.join(VARIANT_KINDS)} "
                          f"(unknown: {', '.join(bad) or 'none'}); --repeats, --steps and --stage-images must be >= 1")


def parse_args(argv: list[str]):
    """`byol bench`'s arguments: the `section.key=value` overrides may stand before, between or after the options
    (`byol bench -- --opt ...` too)."""
    return build_parser().parse_intermixed_args(argv[1:] if argv[:1] == ["--"] else argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `byol bench`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = common.requested_device(args.overrides, args.config)
    _resolve_args(args, device)
    args.defaults = [] if args.no_defaults else common.default_overrides(device)
    overrides = list(args.overrides)
    cfg = _config(args, overrides)
    from byolfast.train.runtime import configure_torch, resolve_precision
    configure_torch(device, cfg.train.num_threads)
    if not args.images and args.what == "stages":   # the stage timers read only their first images
        args.images = max(384, args.stage_images)
    if not args.images:   # an epoch holds each repeat: warm-up, the loaders' read-ahead, the timed batches
        d = cfg.data
        ahead = max(2 * d.num_workers + 1, d.dali.prefetch_queue_depth + 1, d.ffcv.batches_ahead + 1)
        per_epoch = max(args.warmup, args.loader_warmup) + ahead + max(args.steps, args.loader_steps) + 1
        args.images = max(384, per_epoch * cfg.train.batch_size)
    whats = WHATS if args.what == "all" else (args.what,)
    t0 = time.perf_counter()
    matmul_rates: dict[str, float] = {}
    if "model" in whats:   # on CPUs without bf16 units fp32 is the faster dtype: measure both there
        for name, dtype in (("bf16", torch.bfloat16),) + ((("fp32", torch.float32),) if device.type == "cpu" else ()):
            matmul_rates[name] = common.matmul_flops_per_sec(device, args.matmul_size, dtype)
    env = environment.env_info(device, {
        "dtype": resolve_precision(cfg.train.precision, device), "model_arch": cfg.model.arch,
        "image_size": cfg.data.image_size, "batch_size": cfg.train.batch_size, "num_workers": cfg.data.num_workers,
        "dali_threads": cfg.data.dali.num_threads, "dali_decoder": cfg.data.dali.decoder,
        "matmul_tflops": {k: v / 1e12 for k, v in matmul_rates.items()}, "matmul_size": args.matmul_size,
        "timing": {"warmup": args.warmup, "steps": args.steps, "loader_warmup": args.loader_warmup,
                   "loader_steps": args.loader_steps, "repeats": args.repeats, "ema_iters": args.ema_iters}})
    out = Path(args.out)
    records: list[dict] = []

    def save(complete: bool) -> None:   # after every record: a run cut short keeps what it measured
        common.write_json(out, {"what": args.what, "complete": complete, "env": env,
                                "overrides": [*args.defaults, *overrides], "seconds": time.perf_counter() - t0,
                                "records": records})

    sections = {"loader": lambda: bench_loaders(cfg, device, args),
                "model": lambda: bench_model(cfg, device, args, overrides, matmul_rates),
                "e2e": lambda: bench_e2e(cfg, device, args, overrides, [r for r in records if r["what"] == "model"]),
                "ema": lambda: bench_ema(cfg, device, args, overrides),
                "optim": lambda: bench_optim(cfg, device, args, overrides),
                "stages": lambda: bench_stages(cfg, device, *_bench_folder(args), backends=args.backends,
                                               images=args.stage_images, repeats=args.repeats)}
    for what in WHATS:
        if what in whats:
            for rec in sections[what]():
                records.append(rec)
                save(complete=False)
    save(complete=True)
    chart = common.write_bar_chart(out.with_suffix(".png"), records,
                                   f"byol bench on {env['device_name']} ({cfg.model.arch}, {cfg.data.image_size} px)")
    print(format_table(records))
    if "stages" in whats:
        print(stage_table(records))
    for line in summary_lines(records):
        print(line)
    print(f"wrote {out}" + (f" and {chart}" if chart else ""))
    return 0


if __name__ == "__main__":   # `python -m byolfast.benchmarks.bench ...`, with the command's logging and error handling
    from byolfast.train.cli import main as cli_main
    sys.exit(cli_main(["bench", "--", *sys.argv[1:]]))
