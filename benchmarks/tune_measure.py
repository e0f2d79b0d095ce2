"""The measurements behind `byol tune` (`benchmarks.tune`): the loader alone and the training step it feeds, on the
config's own data and model, each setting a validated copy of the config."""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from typing import Optional

from byolfast.benchmarks import common
from byolfast.benchmarks.tune_search import TrialTimeout, cap_deferred, with_settings


class RealMeasure:
    """`Measure` on `cfg`'s data and model: the loader alone with `common.time_epochs` (read-ahead drained first), or
    the trainer's own step fed by the loader, timed per stage with `byol profile`'s `StageTimer`.

    Args:
        cfg: the config whose data and model are measured; each trial applies its settings to a copy.
        loader_steps: timed batches of a loader trial (`byol bench`'s CPU default).
        max_steps: at most this many timed training steps per trial (fewer when its cap comes first).
    """

    def __init__(self, cfg, loader_steps: int = 8, max_steps: int = 12):
        from byolfast.train.distributed import resolve_device

        self.cfg, self.loader_steps, self.max_steps = cfg, loader_steps, max_steps
        self.device = resolve_device(cfg.train.device)

    def __call__(self, kind: str, settings: dict, cap: float) -> dict:
        cfg = with_settings(self.cfg, settings)
        common.free_memory(self.device)
        common.reset_peak_memory(self.device)
        with warnings.catch_warnings():   # more workers than cores is what some trials are for
            warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
            fields = self.loader_only(cfg) if kind == "loader" else self.end_to_end(cfg, time.monotonic() + 0.8 * cap)
        return {**fields, "peak_mem_mb": round(common.peak_memory_mb(self.device))}

    def loader_only(self, cfg) -> dict:
        from byolfast.pipeline import LoaderContext, build_two_view_loader
        from byolfast.train.runtime import DTYPES, resolve_precision

        ctx = LoaderContext(device=self.device, dtype=DTYPES[resolve_precision(cfg.train.precision, self.device)],
                            batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                            channels_last=cfg.model.channels_last)
        with cap_deferred():   # a loader built is a loader closed, whenever the cap expires
            loader = build_two_view_loader(cfg.data, ctx)
        stamps: list[float] = []   # when each batch arrived: what is left of a trial cut at its cap
        try:
            steps = max(2, min(self.loader_steps, len(loader) - 1 - loader.read_ahead))
            # No budget_s: cut to one or two batches, a loader whose workers deliver in bursts would look several
            # times faster than it is. A trial cut at its cap keeps what it timed, if that spans the read-ahead twice.
            secs, first = common.time_epochs(loader, lambda batch: stamps.append(time.perf_counter()), self.device,
                                             warmup=1, steps=steps, repeats=1)
            return {"images_per_sec": ctx.batch_size / common.median(secs), "first_batch_s": round(first, 2)}
        except TrialTimeout:
            timed = stamps[1 + loader.read_ahead:]
            if len(timed) < max(4, 2 * loader.read_ahead):
                raise
            return {"images_per_sec": ctx.batch_size * (len(timed) - 1) / (timed[-1] - timed[0]),
                    "note": f"cut at its cap after {len(timed) - 1} timed batches"}
        finally:
            with cap_deferred():
                loader.close()

    def end_to_end(self, cfg, soft_end: float) -> dict:
        from byolfast.benchmarks.profile import StageTimer, endless_batches, run_facts
        from byolfast.benchmarks.report import build_report
        from byolfast.train.loop import Trainer

        with cap_deferred():   # the trainer's loader is built inside: never left unowned and running
            trainer = Trainer(cfg)
        it = endless_batches(trainer.loader)
        try:
            trainer.model.train()
            timer, step = StageTimer(trainer.device), 0

            def one_step() -> float:
                nonlocal step
                t0 = time.perf_counter()
                with timer("data_wait"):
                    batch = next(it)
                trainer.train_step(batch, step, stage=timer)
                common.sync(trainer.device)
                step += 1
                return time.perf_counter() - t0

            first = one_step()   # start-up: workers, pipeline build, kernels
            for _ in range(trainer.loader.read_ahead):   # the batches prepared while nobody counted
                next(it)
            timer.reset()
            per_step: list[float] = []
            stages: dict[str, float] = {}   # the stage times of the complete steps
            note = ""
            try:   # until the next step would end past the soft end (at least two), a trial cut short keeps its steps
                while len(per_step) < self.max_steps and (
                        len(per_step) < 2 or time.monotonic() + common.median(per_step) < soft_end):
                    per_step.append(one_step())
                    stages = dict(timer.seconds)
            except TrialTimeout:
                if not per_step:
                    raise
                note = f"cut at its cap after {len(per_step)} timed steps"
            facts = run_facts(trainer, peak_mem_mb=common.peak_memory_mb(trainer.device))
            facts.stored_max_side = facts.stored_max_side or stored_max_side(cfg.data.path)
            stats = {k: v for k, v in trainer.loader.stats().items() if isinstance(v, (int, float, str, bool))}
            report = build_report(stages, len(per_step), facts, stats)
            return {"images_per_sec": trainer.loader.ctx.batch_size / common.median(per_step),
                    "data_wait_share": report["data_wait_share"], "first_step_s": round(first, 2),
                    "step_s": round(common.median(per_step), 3), "note": note,
                    "report": {k: report[k] for k in ("bound", "summary", "advice", "stage_shares", "facts")}}
        finally:
            with cap_deferred():
                it.close()
                trainer.loader.close()


def stored_max_side(path: str, sample: int = 16) -> Optional[int]:
    """The longer side of a few images of an ImageFolder tree (headers only), for the report's size advice."""
    from PIL import Image

    files = []
    with contextlib.suppress(OSError):
        for root, _, names in os.walk(path):
            files += [os.path.join(root, n) for n in names if n.lower().endswith((".jpg", ".jpeg", ".png"))][:2]
            if len(files) >= sample:
                break
    sides = []
    for f in files:
        with contextlib.suppress(OSError), Image.open(f) as img:
            sides.append(max(img.size))
    return max(sides) if sides else None
