"""The BYOL training loop: one process or many under torchrun, with atomic checkpoints and exact resume.

Per step (`train.step.Stepper`, built here from the config): two views from the loader -> online (both views) and
target (both views) forward under autocast -> the symmetrised loss in float32 -> backward (DDP all-reduces gradients)
-> LARS step with the scheduled LR -> fused EMA of the target with the scheduled tau. Host-device syncs happen only on
logging, checkpoint and evaluation steps (and every step with `train.on_nonfinite=skip`, which must decide before
updating, or fp16's scaler); the ranks' preemption agreement is asynchronous. `byol profile`, `byol bench` and
`byol tune` time this same step.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from byolfast.model import Byol, build_byol, collapse_std
from byolfast.pipeline import Batch, LoaderContext, TwoViewLoader, build_two_view_loader
from byolfast.pipeline.contract import skipped_images
from byolfast.train import checkpoint as ckpt
from byolfast.train.config import Config, ConfigError, check_world, to_dict
from byolfast.train.distributed import DistInfo, FlagAgreement, check_weights_agree, cleanup, init_distributed
from byolfast.train.metrics import MetricsWriter, Window
from byolfast.train.optim import build_optimizer
from byolfast.train.preempt import PREEMPT_CHECK_EVERY, PREEMPT_MARKER, Preempted, PreemptFlag, stand_preempted
from byolfast.train.runtime import DTYPES, configure_torch, resolve_precision, setup_logging, write_run_info
from byolfast.train.schedules import scaled_lr, target_tau, warmup_cosine_lr
from byolfast.train.step import Forward, NonFiniteError, StageHook, Stepper, StepOutput, no_stage

log = logging.getLogger(__name__)

@dataclass
class Schedule:
    steps_per_epoch: int
    total_steps: int           # the length of the schedules (all epochs)
    stop_step: int             # where this run stops (max_steps, or total_steps)
    warmup_steps: int
    peak_lr: float


@dataclass
class RunState:
    """Everything that is checkpointed besides the model and optimizer."""

    step: int = 0
    history: list = field(default_factory=list)   # logged metrics, for the learning-curve plot


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def build_schedule(cfg: Config, steps_per_epoch: int) -> Schedule:
    if steps_per_epoch < 1:
        raise ConfigError(f"the dataset gives no full batch per rank: train.batch_size={cfg.train.batch_size} is "
                          "larger than the dataset; lower it")
    total = cfg.train.epochs * steps_per_epoch
    stop = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    return Schedule(steps_per_epoch=steps_per_epoch, total_steps=total, stop_step=stop,
                    warmup_steps=round(cfg.train.warmup_epochs * steps_per_epoch),
                    peak_lr=scaled_lr(cfg.train.base_lr, cfg.train.batch_size))


class Trainer:
    """Builds the run from a `Config` and trains it; `run()` returns the summary dict (on every rank)."""

    def __init__(self, cfg: Config, loader: Optional[TwoViewLoader] = None, dist_info: Optional[DistInfo] = None):
        self.cfg = cfg
        t = cfg.train
        self.dist = dist_info or init_distributed(t.device, cfg.dist.backend, cfg.dist.timeout_s)
        setup_logging(self.dist.is_main)
        self.device = self.dist.device
        configure_torch(self.device, t.num_threads)
        per_rank_batch = check_world(cfg, self.dist.world_size)
        self.run_dir = Path(t.out_dir)
        self.precision = resolve_precision(t.precision, self.device)
        self.dtype = DTYPES[self.precision]

        ctx = LoaderContext(device=self.device, dtype=self.dtype, batch_size=per_rank_batch, rank=self.dist.rank,
                            world_size=self.dist.world_size, seed=t.seed, channels_last=cfg.model.channels_last,
                            worker_ignored_signals=tuple(t.preempt_signals))
        self.loader = loader or build_two_view_loader(cfg.data, ctx)
        self.schedule = build_schedule(cfg, len(self.loader))
        self.loader.stop_epoch = -(-self.schedule.stop_step // self.schedule.steps_per_epoch)

        torch.manual_seed(t.seed)   # the same initial weights on every rank (DDP also broadcasts rank 0's)
        self.model: Byol = build_byol(cfg.model, distributed=self.dist.distributed,
                                      device_type=self.device.type).to(self.device)
        self.optimizer = build_optimizer(self.model, t.optimizer, t.momentum, t.weight_decay, t.lars_eta)
        self.forward = self.model
        if self.dist.distributed:
            self.forward = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)   # SyncBN keeps BN statistics identical; no per-step buffer broadcast
        if t.compile:
            self.forward = torch.compile(self.forward)
        sched = self.schedule
        self.stepper = Stepper(
            self.model, self.optimizer, forward=self.forward, device=self.device, precision=self.precision,
            on_nonfinite=t.on_nonfinite, max_skipped_steps=t.max_skipped_steps, world_size=self.dist.world_size,
            lr_at=lambda k: warmup_cosine_lr(k, sched.peak_lr, sched.warmup_steps, sched.total_steps),
            tau_at=lambda k: target_tau(k, t.base_tau, sched.total_steps))
        self.scaler = self.stepper.scaler
        self.state = RunState()
        self.writer = None
        self.eval_monitor = None

    # --- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.state.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": _rng_state(self.device), "config": to_dict(self.cfg),
                "skipped_steps": self.stepper.skipped_steps, "history": self.state.history,
                "arch": self.cfg.model.arch, "small_stem": self.cfg.model.small_stem,
                "steps_per_epoch": self.schedule.steps_per_epoch}

    def save(self) -> Optional[Path]:
        """Rank 0 writes; every rank waits so that no rank runs ahead of a checkpoint it may resume from."""
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.state_dict(), self.run_dir, self.state.step, self.cfg.train.keep_last)
            log.info("checkpoint %s", path)
        if self.dist.distributed:
            torch.distributed.barrier()
        return path

    def resume(self, where: str) -> None:
        """Load `where` (`auto`: the newest valid checkpoint in the run folder, if any) on every rank."""
        found = ckpt.find_resume_point(where, self.run_dir)
        if found is None:
            log.info("no checkpoint in %s: starting from scratch", self.run_dir)
            return
        path, state = found
        ckpt.check_resumable(state, path, to_dict(self.cfg), self.cfg.train.allow_changed,
                             self.schedule.steps_per_epoch)
        if self.dist.is_main:
            ckpt.set_aside_later(self.run_dir, int(state["step"]))
        ckpt.load_model(self.model, state, path)
        ckpt.load_optimizer(self.optimizer, state, path, self.cfg.train.optimizer)
        if state.get("scaler") and self.scaler.is_enabled():   # an fp16 run's scaler; bf16/fp32 saved `{}`
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], self.device)
        self.state = RunState(step=state["step"], history=list(state.get("history", [])))
        self.stepper.skipped_steps = state.get("skipped_steps", 0)
        log.info("resumed from %s at step %d", path, self.state.step)

    # --- the loop ---------------------------------------------------------------------------------------------
    def _log(self, metrics: dict) -> None:
        self.state.history.append(metrics)
        if self.writer is not None:   # rank 0
            self.writer.write(metrics)

    def _check_finite(self) -> None:
        first = self.stepper.first_bad_step()   # host sync: only on logging/checkpoint steps
        if first >= 0:
            raise NonFiniteError(
                f"the loss or a gradient became non-finite at step {first}; stopping. The last good checkpoint in "
                f"{self.run_dir} is kept. Lower train.base_lr, use train.precision=bf16/fp32, or set "
                "train.on_nonfinite=skip to skip such steps")

    def _preempt_pending(self, flag: PreemptFlag, agreement: FlagAgreement) -> bool:
        if not self.dist.distributed:
            return flag.signum is not None
        if self.state.step % PREEMPT_CHECK_EVERY:
            return False
        # All ranks stop at one step: the MAX over the ranks' flags, read one exchange later (no host sync).
        return agreement.exchange(flag.signum is not None)

    def train_step(self, batch: Batch, step: int, *, stage: StageHook = no_stage, forward: Optional[Forward] = None,
                   ema: str = "fused") -> StepOutput:
        """One optimisation step at global step `step` (`Stepper.__call__`: the stage hook, the replacement
        forward and the EMA variant are for the benchmarks); the caller advances `state.step`."""
        return self.stepper(batch, step, stage=stage, forward=forward, ema=ema)

    def run(self) -> dict:
        cfg, t, sched = self.cfg, self.cfg.train, self.schedule
        flag = None
        try:
            if self.dist.is_main and not t.resume:
                ckpt.set_aside_previous_run(self.run_dir)
            if self.dist.is_main:
                write_run_info(self.run_dir, to_dict(cfg), {"world_size": self.dist.world_size,
                                                            "steps_per_epoch": sched.steps_per_epoch,
                                                            "precision": self.precision})
            if self.dist.is_main:   # this run is no longer the preempted one, whatever happens next
                (self.run_dir / PREEMPT_MARKER).unlink(missing_ok=True)
            if t.resume:
                self.resume(t.resume)
            if self.dist.is_main:
                self.writer = MetricsWriter(self.run_dir, purge_step=self.state.step + 1 if self.state.step else None)
            if cfg.eval.every and cfg.eval.data and self.dist.is_main:
                from byolfast.train.evaluate import KnnMonitor
                self.eval_monitor = KnnMonitor(cfg.eval, self.device, cfg.model.channels_last,
                                               cfg.data.augment.mean, cfg.data.augment.std)
            flag = PreemptFlag(t.preempt_signals)
            return self._train(flag)
        except Preempted:
            if self.dist.distributed:   # a torchrun worker exits now; the launcher's SIGTERM must not kill it first
                flag.hold()
                flag = None
            raise
        finally:
            if flag is not None:
                flag.restore()
            self.loader.close()
            if self.writer is not None:
                self.writer.close()

    def _train(self, flag: PreemptFlag) -> dict:
        """The loop: epochs of steps; a log line, the kNN monitor, a checkpoint or a preemption between steps."""
        sched, log_every = self.schedule, self.cfg.train.log_every
        window, last = Window(self.device), {"loss": math.nan, "collapse_std": math.nan}
        self.model.train()
        from tqdm import tqdm
        bar = tqdm(total=sched.stop_step, initial=self.state.step, disable=not self.dist.is_main,
                   desc="byol", unit="step", dynamic_ncols=True)
        agreement = FlagAgreement(self.device)
        while self.state.step < sched.stop_step:
            epoch, start_batch = divmod(self.state.step, sched.steps_per_epoch)
            self.loader.set_epoch(epoch, start_batch)
            it, epoch_start_step = iter(self.loader), self.state.step
            while self.state.step < sched.stop_step:
                batch = window.next_batch(it)
                if batch is None:
                    break
                out = self.train_step(batch, self.state.step)
                window.add(out.loss)
                self.state.step += 1
                bar.update(1)
                end = self.state.step == sched.stop_step
                if self.state.step % log_every == 0 or end:
                    last = self._log_window(window, out, bar)
                self._between_steps(window, end, flag, agreement, bar)
            if self.state.step == epoch_start_step:
                raise RuntimeError(f"the {self.cfg.data.backend} loader yielded no batch in epoch {epoch} although "
                                   f"it reports {sched.steps_per_epoch} per epoch")
        bar.close()
        agreement.finish()   # the exchange still in flight, before any other collective
        self._check_finite()
        final = self.save()
        num_skipped, skipped_note = skipped_images(stats := self.loader.stats())
        if skipped_note and self.dist.is_main:
            log.warning("%s", skipped_note)
        return {"steps": self.state.step, "final_loss": last["loss"], "collapse_std": last["collapse_std"],
                "images_per_sec": window.images / window.seconds if window.seconds else math.nan,
                "skipped_steps": self.stepper.skipped_steps, "skipped_images": num_skipped, "loader": stats,
                "checkpoint": str(final) if final else None, "run_dir": str(self.run_dir)}

    def _log_window(self, window: Window, out: StepOutput, bar) -> dict:
        """Close the metrics window (a host sync: only on logging steps) and log it."""
        self._check_finite()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics = {"step": self.state.step, "epoch": self.state.step / self.schedule.steps_per_epoch,
                   **window.close(self.cfg.train.batch_size, self.dist.distributed, self.dist.world_size),
                   "lr": out.lr, "tau": out.tau, "collapse_std": float(collapse_std(out.projection).item()),
                   "grad_norm": float(out.grad_norm.item())}
        metrics.update({f"loader/{k}": v for k, v in self.loader.stats().items() if isinstance(v, (int, float))})
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", ips=f"{metrics['images_per_sec']:.0f}")
        self._log(metrics)
        window.restart()   # after the logging, as before: the next window times steps only
        return metrics

    def _between_steps(self, window: Window, end: bool, flag: PreemptFlag, agreement: FlagAgreement, bar) -> None:
        """The weight check, the kNN monitor, the periodic checkpoint and a pending preemption, in that order."""
        cfg, step = self.cfg, self.state.step
        if cfg.dist.check_every and step % cfg.dist.check_every == 0:
            check_weights_agree(self.model, step, buffers=cfg.model.bn == "sync")
        if self.eval_monitor is not None and (step % cfg.eval.every == 0 or end):
            t_eval = time.perf_counter()
            acc = self.eval_monitor(self.model.encoder)
            if acc:
                self._log({"step": step, **acc})
            window.pause(time.perf_counter() - t_eval)
        saved = False
        if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and not end:
            self._check_finite()
            self.save()
            saved = True
        # On the last step the run finishes normally (final checkpoint, summary) whatever the signal.
        if not end and self._preempt_pending(flag, agreement):
            self._check_finite()
            path = ckpt.checkpoint_path(self.run_dir, step) if saved else self.save()
            bar.close()
            stand_preempted(self.run_dir, step, path, flag, self.dist.is_main)


def train(cfg: Config) -> dict:
    """Train BYOL as configured; the summary dict on every rank."""
    try:
        return Trainer(cfg).run()
    finally:
        cleanup()
