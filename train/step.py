"""One BYOL training step as a small object with explicit inputs: the step the trainer runs and the one that
`byol profile`, `byol bench` and `byol tune` time.

LR and tau from their schedules -> forward under autocast (online and target on both views, the loss in float32) ->
backward (DDP all-reduces the gradients) -> unscale, gradient norm, finiteness -> LARS step -> EMA of the target.

Host syncs: none, except with `on_nonfinite="skip"`, which must decide before updating, and with fp16, whose grad
scaler reads its overflow flag every step (the EMA then follows the scaler: a step it skips moves neither network).
A non-finite step under `"stop"` is recorded on the device (`bad_step`) and read by the caller on its own sync steps
(`first_bad_step`). Benchmarks see into the step through the stage hook (a context manager per stage, a no-op by
default) and may swap in a forward that names its own stages, or the per-parameter EMA.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, NamedTuple, Optional

import torch

from byolfast.model import Byol, ByolOutput, ema_update_loop_
from byolfast.pipeline import Batch
from byolfast.train.runtime import autocast

log = logging.getLogger(__name__)

StageHook = Callable[[str], contextlib.AbstractContextManager]
Forward = Callable[[torch.Tensor, torch.Tensor], ByolOutput]
NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN/inf; the message names the step."""


class StepOutput(NamedTuple):
    loss: torch.Tensor           # detached, on the device
    projection: torch.Tensor     # online projections of view 1 (detached), for the collapse monitor
    grad_norm: torch.Tensor      # of the unscaled gradients, on the device
    lr: float
    tau: float


def no_stage(name: str) -> contextlib.AbstractContextManager:
    """The default stage hook: names nothing, times nothing, syncs nothing."""
    return contextlib.nullcontext()


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def all_reduce_mean_(params: list[torch.Tensor], world_size: int) -> None:
    """Average the gradients over the ranks, as DDP does inside the backward pass."""
    grads = [p.grad for p in params if p.grad is not None]
    works = [torch.distributed.all_reduce(g, async_op=True) for g in grads]
    for w in works:
        w.wait()
    torch._foreach_mul_(grads, 1.0 / world_size)


class Stepper:
    """BYOL's optimisation step over explicit parts; it owns its counters (skipped steps, fp16 overflows in a row,
    the first non-finite step). Built without a loader, a run folder or a process group.

    Args:
        model: the BYOL model (online, predictor, target); its `update_target` is the EMA.
        optimizer: over the model's trainable parameters (LARS or SGD).
        lr_at, tau_at: the schedules, pure functions of the global step.
        device: where the step runs (autocast's device type, the counters' device).
        precision: `bf16`, `fp16` (autocast + gradient scaler) or `fp32`.
        forward: the callable that runs the model on two views (the DDP-wrapped and/or compiled model); the model
            itself by default.
        scaler: fp16's gradient scaler; one is made (enabled only for fp16) when not given.
        on_nonfinite: `stop` (record the step; the caller raises at its next sync) or `skip` the update.
        max_skipped_steps: with `skip`, raise after this many skipped steps; with fp16, after this many overflowing
            steps in a row.
        world_size: ranks averaging gradients; a replacement `forward` given to `__call__` is not DDP, so with more
            than one rank the gradients are then all-reduced after the backward pass.
    """

    def __init__(self, model: Byol, optimizer: torch.optim.Optimizer, *, lr_at: Callable[[int], float],
                 tau_at: Callable[[int], float], device: torch.device, precision: str,
                 forward: Optional[Forward] = None, scaler: Optional[torch.amp.GradScaler] = None,
                 on_nonfinite: str = "stop", max_skipped_steps: int = 100, world_size: int = 1):
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
        self.model, self.optimizer = model, optimizer
        self.lr_at, self.tau_at = lr_at, tau_at
        self.device, self.precision = device, precision
        self.forward = forward or model
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.on_nonfinite, self.max_skipped_steps, self.world_size = on_nonfinite, max_skipped_steps, world_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)   # first non-finite step, or -1
        self.skipped_steps = 0          # `skip` policy: steps whose update was skipped
        self.overflows_in_a_row = 0     # fp16: consecutive steps the grad scaler skipped

    def first_bad_step(self) -> int:
        """The first step whose loss or gradient was non-finite under `stop`, or -1 (a host sync)."""
        return int(self.bad_step.item())

    def __call__(self, batch: Batch, step: int, *, stage: StageHook = no_stage, forward: Optional[Forward] = None,
                 ema: str = "fused") -> StepOutput:
        """One optimisation step at global step `step` (the caller counts the steps).

        Args:
            batch: the loader's two views.
            step: the global step, for the LR and tau schedules and the non-finite record.
            stage: `stage(name)` gives a context manager around each stage ("forward", "backward", "all_reduce",
                "optimizer", "ema"), e.g. the profiler's timer; the default adds no work and no sync.
            forward: in place of `self.forward`, one that returns a `ByolOutput` and names its own stages (the
                profiler's stage-by-stage forward).
            ema: "fused" (the model's `update_target`) or "loop" (the per-parameter reference, for benchmarks).
        """
        if ema not in ("fused", "loop"):
            raise ValueError(f"ema must be 'fused' or 'loop', got {ema!r}")
        optimizer, scaler = self.optimizer, self.scaler
        lr, tau = self.lr_at(step), self.tau_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.precision):
            if forward is None:
                with stage("forward"):
                    out = self.forward(batch.view1, batch.view2)
            else:
                out = forward(batch.view1, batch.view2)
        with stage("backward"):
            scaler.scale(out.loss).backward()
        if forward is not None and self.world_size > 1:
            with stage("all_reduce"):
                all_reduce_mean_(self.params, self.world_size)
        check = self.on_nonfinite if self.precision != "fp16" else None
        with stage("optimizer"):
            scaler.unscale_(optimizer)
            norm = grad_norm(self.params)
            finite = torch.isfinite(out.loss.detach()) & torch.isfinite(norm)
            skip = check == "skip" and not bool(finite)   # host sync (skip mode only)
            # fp16: the scaler skips the optimizer step iff a gradient is inf/NaN, which is iff their norm is;
            # reading it here costs no extra wait, since `scaler.step` syncs on the same flag a moment later.
            overflow = scaler.is_enabled() and not bool(torch.isfinite(norm))
            if not skip:
                if check == "stop":
                    bad = self.bad_step
                    self.bad_step = torch.where(finite | (bad >= 0), bad, torch.full_like(bad, step))
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
        if skip:
            self._count_skipped(step)
        elif overflow:
            self._count_overflow(step)
        else:
            self.overflows_in_a_row = 0
            with stage("ema"):
                if ema == "fused":
                    self.model.update_target(tau)
                else:
                    ema_update_loop_(self.model.ema_pairs(), tau)
        return StepOutput(out.loss.detach(), out.projection, norm, lr, tau)

    def _count_skipped(self, step: int) -> None:
        self.skipped_steps += 1
        log.warning("step %d: non-finite loss/gradient, step skipped (%d so far)", step, self.skipped_steps)
        if self.skipped_steps > self.max_skipped_steps:
            raise NonFiniteError(f"more than train.max_skipped_steps={self.max_skipped_steps} steps were non-finite "
                                 f"(the last at step {step})")

    def _count_overflow(self, step: int) -> None:
        log.debug("step %d: fp16 gradients overflowed; the grad scaler skipped the step and the EMA", step)
        self.overflows_in_a_row += 1
        if self.overflows_in_a_row > self.max_skipped_steps:
            raise NonFiniteError(f"the fp16 gradients were inf/NaN on {self.overflows_in_a_row} steps in a row "
                                 f"(up to step {step}; train.max_skipped_steps={self.max_skipped_steps}): the run "
                                 "has diverged. Lower train.base_lr, or use train.precision=bf16/fp32")
