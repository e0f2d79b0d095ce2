"""`byol profile`: training steps under torch.profiler, a TensorBoard trace, and a bottleneck report in plain words.

The step is the trainer's own (`Trainer.train_step`), run with a stage hook so that each stage shows up as a range in
the trace (`record_function`, plus NVTX on GPUs for Nsight Systems) and gets its own wall time, and with the forward
taken apart into the model's pieces (`SplitForward`):
    data_wait -> forward_online -> forward_target -> loss -> backward -> all_reduce -> optimizer -> ema
Stage times are exact because the device is synchronised at every stage boundary (those syncs exist only in the
profiler's hook, not in the trainer), which makes a profiled step slightly slower than a real one. Under DDP the
trainer overlaps the gradient all-reduce with the backward pass; with the split forward, DDP does not see the model
and the step all-reduces the gradients after it, so the `all_reduce` stage shows the communication's full, unhidden
cost.

    byol profile --steps 10 --out runs/profile data.backend=dali data.path=/data/shards
    tensorboard --logdir runs/profile     # with torch-tb-profiler: Overview, Operator, Trace and Memory views
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch

from byolfast.benchmarks import common, environment
from byolfast.benchmarks.report import RunFacts, build_report, render_text

if TYPE_CHECKING:
    from byolfast.model import Byol, ByolOutput
    from byolfast.train.step import StageHook

log = logging.getLogger(__name__)


class StageTimer:
    """`with timer("backward"): ...` names a range for the profiler (and NVTX) and adds its wall time to `seconds`.

    Args:
        device: the training device; with `sync`, it is synchronised on entering and leaving each stage.
        sync: make the times exact on GPUs (off: the ranges remain, the times are only host times).
    """

    def __init__(self, device: torch.device, sync: bool = True):
        self.device = device
        self.sync = sync and device.type == "cuda"
        self.nvtx = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with torch.profiler.record_function(name):
            if self.nvtx:
                torch.cuda.nvtx.range_push(name)
            try:
                yield
            finally:
                if self.nvtx:
                    torch.cuda.nvtx.range_pop()
                if self.sync:
                    torch.cuda.synchronize(self.device)
        self.seconds[name] += time.perf_counter() - t0


class SplitForward:
    """`model.Byol.forward` taken apart into the stages forward_online -> forward_target -> loss, for
    `Trainer.train_step(forward=...)`.

    It calls the model's own pieces (`online_projection`, `predictor`, `target_projection`, `regression_loss`),
    compiled when `compile`, and returns the same `ByolOutput`.

    Args:
        model: the trainer's `Byol` (not its DDP wrapper: the step all-reduces the gradients itself).
        stage: the stage hook, e.g. a `StageTimer`.
        compile: `torch.compile` each piece, as `train.compile=true` compiles the whole forward.
    """

    def __init__(self, model: Byol, stage: StageHook, compile: bool = False):
        self.model, self.stage = model, stage
        pieces = (model.online_projection, model.predictor, model.target_projection)
        if compile:
            pieces = tuple(torch.compile(f) for f in pieces)
        self.online, self.predictor, self.target = pieces

    def __call__(self, view1: torch.Tensor, view2: torch.Tensor) -> ByolOutput:
        from byolfast.model import ByolOutput, regression_loss

        with self.stage("forward_online"):
            z1, z2 = self.online(view1), self.online(view2)
            q1, q2 = self.predictor(z1), self.predictor(z2)
        with self.stage("forward_target"), torch.no_grad():
            self.model.target.train(self.model.training)
            t1, t2 = self.target(view1), self.target(view2)
        with self.stage("loss"):
            loss = (regression_loss(q1, t2) + regression_loss(q2, t1)).mean()
        return ByolOutput(loss, z1.detach())


def endless_batches(loader) -> Iterator:
    """The loader's batches epoch after epoch, as the trainer visits them."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        seen = 0
        for batch in loader:
            seen += 1
            yield batch
        if not seen:
            raise RuntimeError(f"the loader yielded no batch in epoch {epoch}")
        epoch += 1


def run_facts(trainer, ema: str = "fused", peak_mem_mb: Optional[float] = None) -> RunFacts:
    """The report's facts about a built trainer."""
    from byolfast.train.runtime import cpu_has_native_bf16

    cfg, device = trainer.cfg, trainer.device
    stats = trainer.loader.stats()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return RunFacts(
        device_type=device.type, data=cfg.data, batch_size=trainer.loader.ctx.batch_size,
        image_size=cfg.data.image_size, precision=trainer.precision, channels_last=cfg.model.channels_last,
        compile=cfg.train.compile, cpu_count=cpus,
        stored_max_side=stats.get("stored_max_side"), peak_mem_mb=peak_mem_mb,
        total_mem_mb=common.total_memory_mb(device), world_size=trainer.dist.world_size, ema=ema,
        cpu_bf16=device.type == "cuda" or cpu_has_native_bf16())


def profile_run(cfg, out_dir: str | Path, steps: int, wait: int = 1, warmup: int = 1, with_stack: bool = False,
                ema: str = "fused") -> dict:
    """Profile `steps` steps of the configured run (after `wait` + `warmup` unrecorded ones); the report dict.

    Writes to `out_dir`: the TensorBoard trace (`*.pt.trace.json`), `report.json`, `report.txt` and `ops.txt`
    (the operators that took the most time).
    """
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    from byolfast.train.loop import Trainer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg)
    device = trainer.device
    timer = StageTimer(device)
    forward = SplitForward(trainer.model, timer, cfg.train.compile)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    it = endless_batches(trainer.loader)
    trainer.model.train()
    try:
        common.reset_peak_memory(device)
        with profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=steps, repeat=1),
                     on_trace_ready=tensorboard_trace_handler(str(out)), record_shapes=True, profile_memory=True,
                     with_stack=with_stack) as prof:
            for step in range(wait + warmup + steps):
                if step == wait + warmup:
                    timer.reset()   # time exactly the steps the profiler records
                with timer("data_wait"):
                    batch = next(it)
                trainer.train_step(batch, step, stage=timer, forward=forward, ema=ema)
                prof.step()
        peak = common.peak_memory_mb(device)
        ops = prof.key_averages().table(sort_by="self_device_time_total" if device.type == "cuda"
                                        else "self_cpu_time_total", row_limit=25)
        facts = run_facts(trainer, ema=ema, peak_mem_mb=peak)
        stats = {k: v for k, v in trainer.loader.stats().items() if isinstance(v, (int, float, str, bool))}
    finally:
        it.close()
        trainer.loader.close()
    report = build_report(dict(timer.seconds), steps, facts, stats)
    report.update({"device": str(device), "device_name": environment.device_name(device), "peak_mem_mb": peak,
                   "trace_dir": str(out), "rank": trainer.dist.rank})
    if trainer.dist.is_main:   # under torchrun every rank writes its own trace, rank 0 the report
        common.write_json(out / "report.json", report)
        (out / "report.txt").write_text(render_text(report))
        (out / "ops.txt").write_text(ops)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byol profile", description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", help="a YAML preset (configs/*.yaml); several: later ones override "
                   "earlier ones, as in byol train")
    p.add_argument("--steps", type=int, default=5, help="profiled (active) steps")
    p.add_argument("--wait", type=int, default=1, help="steps before the profiler starts")
    p.add_argument("--warmup", type=int, default=1, help="steps the profiler runs but discards")
    p.add_argument("--out", default="runs/profile", help="folder for the trace and the report")
    p.add_argument("--with-stack", action="store_true", help="record Python stacks (larger trace)")
    p.add_argument("--ema", choices=("fused", "loop"), default="fused", help="the target update to profile")
    p.add_argument("--no-defaults", action="store_true",
                   help="do not apply the small default sizes (ResNet-18/64 px on CPU, ResNet-50/224 px on GPU)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `byol profile`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)   # `byol profile -- --opt ...`
    if args.steps < 1 or args.wait < 0 or args.warmup < 0:
        from byolfast.train.config import ConfigError
        raise ConfigError("--steps must be >= 1, --wait and --warmup >= 0")
    device = common.requested_device(args.overrides, args.config)
    defaults = [] if args.no_defaults else common.default_overrides(device)
    cfg = common.load_bench_config(args.config, args.overrides, defaults)
    report = profile_run(cfg, args.out, args.steps, args.wait, args.warmup, args.with_stack, args.ema)
    if report["rank"] == 0:
        print(render_text(report))
        print(f"trace and report in {args.out}: tensorboard --logdir {args.out}")
    return 0


if __name__ == "__main__":   # `python -m byolfast.benchmarks.profile ...`, with the command's logging and errors
    from byolfast.train.cli import main as cli_main
    sys.exit(cli_main(["profile", "--", *sys.argv[1:]]))
