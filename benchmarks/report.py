"""The bottleneck report: from per-stage times of training steps to a verdict and the next thing to try.

Pure functions of plain data, so the logic is tested without running a model. A step is split into
`STAGES`; the share of `data_wait` decides between input-bound (the model waits for the loader) and compute-bound,
and the facts of the run (the data config, precision, memory format, compile, batch, memory) turn into advice: the
loader's from its backend's record (`pipeline.registry.BACKENDS[...].advice`), the model's from here.
The table and summary lines of `byol bench` records live here too.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from byolfast.pipeline.config import DataConfig

STAGES = ("data_wait", "forward_online", "forward_target", "loss", "backward", "all_reduce", "optimizer", "ema")
COMPUTE_STAGES = ("forward_online", "forward_target", "loss", "backward")
INPUT_BOUND_SHARE = 0.15   # waiting for data above this share of the step: the loader is the bottleneck
NOTABLE_SHARE = 0.05       # a side stage (EMA, all-reduce) above this share deserves a remark


@dataclass
class RunFacts:
    """What the advice depends on, resolved from the config and the machine.

    Args:
        device_type: `cuda` or `cpu`.
        data: the data config the loader was built from (its backend, workers and backend section).
        batch_size: samples per step on this device.
        image_size: side of the views.
        precision: `bf16`, `fp16` or `fp32`.
        channels_last, compile: the model's memory format and whether it is compiled.
        cpu_count: host cores available to the loader.
        stored_max_side: longer side of the stored images, where the loader reports it.
        peak_mem_mb, total_mem_mb: peak and total device memory.
        world_size: processes in the job.
        ema: `fused` or `loop`.
        cpu_bf16: the CPU computes bfloat16 natively (else bf16 autocast is slower there than float32).
    """

    device_type: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 32
    image_size: int = 224
    precision: str = "bf16"
    channels_last: bool = True
    compile: bool = False
    cpu_count: int = 1
    stored_max_side: Optional[int] = None
    peak_mem_mb: Optional[float] = None
    total_mem_mb: Optional[float] = None
    world_size: int = 1
    ema: str = "fused"
    cpu_bf16: bool = True

    @property
    def backend(self) -> str:
        return self.data.backend


def stage_shares(stage_seconds: dict[str, float]) -> dict[str, float]:
    """Each stage's share of the summed time (0 for every stage when nothing was timed)."""
    total = sum(max(0.0, v) for v in stage_seconds.values())
    return {k: (max(0.0, v) / total if total > 0 else 0.0) for k, v in stage_seconds.items()}


def classify(shares: dict[str, float], threshold: float = INPUT_BOUND_SHARE) -> str:
    """`input-bound` when waiting for data takes at least `threshold` of the step, else `compute-bound`."""
    return "input-bound" if shares.get("data_wait", 0.0) >= threshold else "compute-bound"


def input_advice(f: RunFacts, loader_stats: Optional[dict] = None) -> list[str]:
    """What makes the loader faster: its backend's advice (given the loader's `stats()`), then what holds for any
    backend that reads images."""
    from byolfast.pipeline.registry import BACKENDS

    backend = BACKENDS.get(f.backend)
    if backend is None:
        return []
    tips = backend.advice(f.data, f.device_type, f.cpu_count, loader_stats or {})
    if f.stored_max_side and f.stored_max_side > max(256, int(1.15 * f.image_size)):
        tips.append(f"lower the stored JPEG size: images are stored at up to {f.stored_max_side} px for "
                    f"{f.image_size} px views; `byol convert --max-side {max(256, int(1.15 * f.image_size))}` makes "
                    "decoding several times cheaper")
    if backend.bench_path is not None and f.cpu_count < 8 and f.device_type == "cuda":
        tips.append(f"the host has only {f.cpu_count} CPU cores for decoding: prefer GPU decoding (DALI mixed)")
    return tips


def compute_advice(f: RunFacts, shares: dict[str, float], mfu: Optional[float] = None) -> list[str]:
    """What makes the model step faster, given the run's settings and where the time goes."""
    tips = []
    if f.precision == "fp32" and (f.device_type == "cuda" or f.cpu_bf16):
        tips.append("use train.precision=bf16: autocast runs the convolutions in bfloat16 (the loss stays float32)")
    if not f.channels_last:
        tips.append("set model.channels_last=true: convolutions are faster in NHWC")
    if not f.compile:
        tips.append("enable train.compile=true: torch.compile fuses the element-wise ops (BatchNorm, ReLU, adds)")
    if f.device_type == "cuda" and f.peak_mem_mb and f.total_mem_mb and f.peak_mem_mb < 0.5 * f.total_mem_mb:
        factor = 2 if f.peak_mem_mb < 0.4 * f.total_mem_mb else 1.5
        per_device = int(f.batch_size * factor)   # f.batch_size is this rank's share; train.batch_size is global
        tips.append(f"use a larger batch: the step peaks at {f.peak_mem_mb / 1024:.1f} of "
                    f"{f.total_mem_mb / 1024:.0f} GiB; try train.batch_size={per_device * max(1, f.world_size)} "
                    f"({per_device} per device)")
    if shares.get("ema", 0.0) >= NOTABLE_SHARE:
        tips.append(f"the target EMA takes {100 * shares['ema']:.0f}% of the step: "
                    + ("use the fused update (ema_update_)" if f.ema == "loop"
                       else "it is memory-bound; a larger batch amortises it"))
    if shares.get("optimizer", 0.0) >= 0.15:
        tips.append(f"the optimizer takes {100 * shares['optimizer']:.0f}% of the step: a larger batch amortises "
                    "LARS's per-parameter work")
    if f.world_size > 1 and shares.get("all_reduce", 0.0) >= NOTABLE_SHARE:
        tips.append(f"gradient all-reduce takes {100 * shares['all_reduce']:.0f}% of the step: use a larger per-GPU "
                    "batch or faster interconnect (NCCL over NVLink/InfiniBand)")
    if not tips:
        where = f" at {100 * mfu:.0f}% of the measured bf16 matmul rate" if mfu else ""
        tips.append(f"the step is compute-bound{where} with every speed-up on: add devices (torchrun) to go faster")
    return tips


def build_report(stage_seconds: dict[str, float], steps: int, facts: RunFacts, loader_stats: Optional[dict] = None,
                 mfu: Optional[float] = None, threshold: float = INPUT_BOUND_SHARE) -> dict:
    """The verdict for `steps` steps whose stages took `stage_seconds` in total (seconds per stage, summed).

    Returns a JSON-ready dict: per-stage seconds per step and shares, the data-wait share, `bound`, images/sec,
    the advice (input advice first when input-bound) and a one-paragraph `summary`.
    """
    times = {k: float(stage_seconds.get(k, 0.0)) for k in STAGES}
    times.update({k: float(v) for k, v in stage_seconds.items() if k not in times})
    shares = stage_shares(times)
    bound = classify(shares, threshold)
    step_s = sum(times.values()) / max(1, steps)
    ips = facts.batch_size * facts.world_size / step_s if step_s > 0 else 0.0
    if bound == "input-bound":
        advice = input_advice(facts, loader_stats) + compute_advice(facts, shares, mfu)[:1]
    else:
        advice = compute_advice(facts, shares, mfu)
    top = sorted((k for k in shares if k != "data_wait"), key=lambda k: -shares[k])[:3]
    summary = (f"{bound}: waiting for data is {100 * shares['data_wait']:.0f}% of the step "
               f"({1000 * step_s:.1f} ms per step, {ips:.0f} images/s with the {facts.backend} loader); "
               f"the largest compute stages are " + ", ".join(f"{k} {100 * shares[k]:.0f}%" for k in top) + ". "
               f"Next: {advice[0]}.")
    return {"bound": bound, "data_wait_share": shares["data_wait"], "threshold": threshold, "steps": steps,
            "step_ms": 1000 * step_s, "images_per_sec": ips,
            "stage_ms_per_step": {k: 1000 * v / max(1, steps) for k, v in times.items()},
            "stage_shares": shares, "advice": advice, "summary": summary, "facts": asdict(facts),
            "loader_stats": dict(loader_stats or {}), "mfu_bf16": mfu}


def render_text(report: dict) -> str:
    """The report in plain words, for the terminal and `report.txt`."""
    lines = [f"Bottleneck report ({report['steps']} profiled steps, {report['step_ms']:.1f} ms per step, "
             f"{report['images_per_sec']:.0f} images/s)", "", "Share of step time per stage:"]
    for k, share in sorted(report["stage_shares"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {k:<15} {100 * share:5.1f}%  {report['stage_ms_per_step'][k]:9.2f} ms  "
                     + "#" * round(40 * share))
    lines += ["", f"Verdict: {report['bound']} (waiting for data: {100 * report['data_wait_share']:.0f}% of the step; "
              f"input-bound from {100 * report['threshold']:.0f}%)."]
    if report.get("mfu_bf16"):
        lines.append(f"Model maths runs at {100 * report['mfu_bf16']:.1f}% of the measured bf16 matmul rate.")
    lines += ["", "Next steps, most useful first:"] + [f"  {i}. {tip}" for i, tip in enumerate(report["advice"], 1)]
    stats = {k: v for k, v in report.get("loader_stats", {}).items() if not isinstance(v, (list, dict))}
    if stats:
        lines += ["", "Loader: " + ", ".join(f"{k}={v}" for k, v in stats.items())]
    return "\n".join(lines) + "\n"


def hidden_ratio(e2e_images_per_sec: float, model_images_per_sec: float) -> Optional[float]:
    """End-to-end over model-only throughput: 1.0 means the input pipeline is completely hidden."""
    if not model_images_per_sec or model_images_per_sec <= 0:
        return None
    return e2e_images_per_sec / model_images_per_sec


# --- bench records ---------------------------------------------------------------------------------------------
def record_label(rec: dict) -> str:
    return str(rec.get("backend") or rec.get("variant") or "?")


def record_value(rec: dict) -> tuple[float, str]:
    """The headline number of a record and its unit."""
    if "ms_per_update" in rec:
        return float(rec.get("ms_per_update") or math.nan), "ms/update"
    return float(rec.get("images_per_sec") or math.nan), "images/s"


def format_table(records: Sequence[dict]) -> str:
    """A compact fixed-width table of the records."""
    head = f"{'what':<7} {'backend/variant':<24} {'device':<8} {'batch':>5} {'res':>4} {'value':>10} {'unit':<10} " \
           f"{'peak MB':>8}  note"
    lines = [head, "-" * len(head)]
    for r in records:
        value, unit = record_value(r)
        note = r.get("error") or r.get("note") or ""
        if "ratio_to_model" in r and r["ratio_to_model"] is not None:
            note = f"x{r['ratio_to_model']:.2f} of model-only {note}".strip()
        if r.get("fraction_of_peak_matmul") is not None:
            note = f"{100 * r['fraction_of_peak_matmul']:.1f}% of peak matmul {note}".strip()
        peak = r.get("peak_mem_mb")
        lines.append(f"{r.get('what', ''):<7} {record_label(r)[:24]:<24} {str(r.get('device', ''))[:8]:<8} "
                     f"{r.get('batch_size') or '':>5} {r.get('resolution') or '':>4} "
                     f"{'-' if math.isnan(value) else f'{value:.3g}':>10} {unit:<10} "
                     f"{'-' if peak is None else f'{peak:.0f}':>8}  {note[:70]}")
    return "\n".join(lines)


def summary_lines(records: list[dict]) -> list[str]:
    """The ratios worth reading first: loaders against the torch baseline, pipeline hidden or not, EMA against its
    bound."""
    lines = []
    loaders = {r["backend"]: r["images_per_sec"] for r in records
               if r.get("what") == "loader" and r.get("images_per_sec")}
    if "torch" in loaders:
        for backend, rate in loaders.items():
            if backend != "torch":
                lines.append(f"loader {backend}: {rate / loaders['torch']:.2f}x the torch baseline "
                             f"({rate:.0f} vs {loaders['torch']:.0f} images/s)")
    for r in records:
        if r.get("what") == "e2e" and r.get("backend") != "synthetic" and r.get("ratio_to_model") is not None:
            ratio = r["ratio_to_model"]
            lines.append(f"e2e {r['backend']}: {ratio:.2f} of model-only: " + (
                "the input pipeline is hidden" if ratio >= 0.95 else
                f"the input pipeline costs {100 * (1 - ratio):.0f}% of the model-only rate"))
    ema = {r["variant"]: r for r in records if r.get("what") == "ema"}
    if {"fused", "loop", "bound"} <= ema.keys():
        lines.append(f"ema: fused {ema['fused']['ms_per_update']:.3f} ms = {ema['fused']['ratio_to_bound']:.2f}x the "
                     f"bandwidth bound ({ema['bound']['ms_per_update']:.3f} ms); loop is "
                     f"{ema['loop']['ratio_to_fused']:.2f}x fused ({ema['fused']['num_values'] / 1e6:.1f}M values)")
        host = ema["fused"].get("host_ms_per_update")
        if host is not None:
            bound_by = "the host's launches" if host >= 0.8 * ema["fused"]["ms_per_update"] else "the device"
            lines.append(f"ema: fused issues in {host:.3f} ms on the host: bound by {bound_by}")
    return lines
