"""`byol bench --what ema|optim`: the per-step updates of the weights, timed on the configured model.

- ema: milliseconds per target update, fused (`_foreach_lerp_`) and per-parameter loop, against the time a copy
  needs to move the same bytes (lerp reads two tensors and writes one).
- optim: milliseconds per LARS step on random gradients, the fused step against the per-tensor reference
  (`lars_step_per_tensor_`: the trust ratios as a list of 0-d tensors), timed alternately.
"""
from __future__ import annotations

from functools import partial

import torch

from byolfast.benchmarks import common


# --- EMA -------------------------------------------------------------------------------------------------------------
def bench_ema(cfg, device: torch.device, args, overrides: list[str]) -> list[dict]:
    """ms per target update of the configured model (ResNet-50 + projector unless `model.arch` is given, also on
    CPUs): fused, loop, and the bound."""
    from byolfast.model import build_byol, ema_update_, ema_update_loop_

    cfg = common.load_bench_config(args.config, overrides, [d for d in args.defaults if not d.startswith("model.")])

    common.free_memory(device)
    common.reset_peak_memory(device)
    model = build_byol(cfg.model).to(device)
    pairs = model.ema_pairs()
    numel = sum(t.numel() for t in pairs.target_params)
    itemsize = pairs.target_params[0].element_size()
    pairs_dtype = pairs.target_params[0].dtype
    buffer_bytes = sum(t.numel() * t.element_size() for t in pairs.target_buffers)
    moved = 3 * numel * itemsize + 2 * buffer_bytes   # lerp: read target and online, write target; buffers: copied
    iters = max(1, args.ema_iters)
    tau = cfg.train.base_tau
    base = dict(arch=cfg.model.arch, num_values=numel, num_tensors=len(pairs.target_params), buffer_bytes=buffer_bytes,
                bytes_moved=moved)
    records = []
    for variant, update in (("fused", ema_update_), ("loop", ema_update_loop_)):
        common.reset_peak_memory(device)
        secs = common.time_repeats(partial(update, pairs, tau), device, warmup=2, iters=iters, repeats=args.repeats)
        ms = 1000 * common.median(secs)
        records.append({**common.record("ema", "variant", variant, cfg, device, **base), "ms_per_update": ms,
                        "gb_per_sec": moved / ms / 1e6, "peak_mem_mb": common.peak_memory_mb(device)})
        if device.type == "cuda":   # the launch side alone: is the update bound by the host or by memory?
            records[-1]["host_ms_per_update"] = 1000 * common.host_seconds_per_call(
                partial(update, pairs, tau), device, iters)
    del model, pairs
    common.free_memory(device)
    rates = common.stream_bytes_per_sec(device, numel, pairs_dtype)
    bandwidth = max(rates.values())   # the faster of the two ways to move the bytes
    bound_ms = 1000 * moved / bandwidth
    records.append({**common.record("ema", "variant", "bound", cfg, device, **base), "ms_per_update": bound_ms,
                    "gb_per_sec": bandwidth / 1e9, "copy_gb_per_sec": rates["copy"] / 1e9,
                    "read2_write1_gb_per_sec": rates["read2_write1"] / 1e9,
                    "note": "3 x parameter bytes + 2 x buffer bytes at the measured copy / in-place add bandwidth"})
    fused, loop = records[0]["ms_per_update"], records[1]["ms_per_update"]
    records[0]["ratio_to_bound"] = fused / bound_ms
    records[1]["ratio_to_bound"] = loop / bound_ms
    records[1]["ratio_to_fused"] = loop / fused
    for r in records:
        r["images_per_sec"] = None
        r["batch_size"] = r["resolution"] = None
    return records


# --- optimizer -------------------------------------------------------------------------------------------------------
def bench_optim(cfg, device: torch.device, args, overrides: list[str]) -> list[dict]:
    """ms per LARS step of the configured model (ResNet-50 + heads unless `model.arch` is given, also on CPUs) on
    random gradients: the fused step and the per-tensor reference, alternating repeats on one model."""
    from byolfast.model import build_byol
    from byolfast.train.optim import build_optimizer, lars_step_per_tensor_

    cfg = common.load_bench_config(args.config, overrides, [d for d in args.defaults if not d.startswith("model.")])
    common.free_memory(device)
    model = build_byol(cfg.model).to(device)
    t = cfg.train
    optimizer = build_optimizer(model, "lars", t.momentum, t.weight_decay, t.lars_eta)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)   # in the parameter's memory format, as autograd makes them
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    steps = {"fused": optimizer.step, "per_tensor": partial(lars_step_per_tensor_, optimizer)}
    secs: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():   # warm-up: momentum buffers, the fused step's ratio views
        common.time_repeats(step, device, warmup=1, iters=1, repeats=1)
    for _ in range(args.repeats):   # alternating, so that both see the same machine
        for name, step in steps.items():
            secs[name] += common.time_repeats(step, device, warmup=0, iters=args.optim_iters, repeats=1)
    base = dict(arch=cfg.model.arch, num_values=sum(p.numel() for p in params), num_tensors=len(params),
                images_per_sec=None, batch_size=None, resolution=None)
    records = [{**common.record("optim", "variant", name, cfg, device), **base,
                "ms_per_update": 1000 * common.median(s), "runs_ms": [1000 * x for x in s]} for name, s in secs.items()]
    records[1]["ratio_to_fused"] = records[1]["ms_per_update"] / records[0]["ms_per_update"]
    del model, optimizer, params
    common.free_memory(device)
    return records


# --- the command -----------------------------------------------------------------------------------------------------
