"""One BYOL training step, the body of `train.loop.Trainer.train_step`: the step the trainer runs and the one that
`byol profile` and `byol bench` time.

LR and tau from the schedules -> forward under autocast (online and target on both views, the loss in float32) ->
backward (DDP all-reduces the gradients) -> unscale, gradient norm, finiteness -> LARS step -> EMA of the target.
The step has no host sync except with `train.on_nonfinite=skip`, which must decide before updating, and with fp16,
whose grad scaler reads its overflow flag every step (the EMA then follows the scaler: a step it skips moves neither
network). Benchmarks see
into it through the stage hook (a context manager per stage, a no-op by default) and may swap in a forward that names
its own stages, or the per-parameter EMA.
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch

from model import ByolOutput, ema_update_loop_
from pipeline import Batch
from train.runtime import autocast
from train.schedules import target_tau, warmup_cosine_lr

if TYPE_CHECKING:
    from train.loop import Trainer

log = logging.getLogger(__name__)

StageHook = Callable[[str], contextlib.AbstractContextManager]
Forward = Callable[[torch.Tensor, torch.Tensor], ByolOutput]


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


def train_step(trainer: Trainer, batch: Batch, step: int, *, stage: StageHook = no_stage,
               forward: Optional[Forward] = None, ema: str = "fused") -> StepOutput:
    """One optimisation step of `trainer` at global step `step`; the caller advances `trainer.state.step`.

    A non-finite loss or gradient norm is recorded in `trainer.bad_step` (`train.on_nonfinite=stop`, checked by the
    loop on its sync steps) or skips the update and counts it (`skip`); with fp16 the grad scaler skips a step whose
    gradients overflowed (and lowers its scale), and the target's EMA is skipped with it.

    Args:
        trainer: the built trainer (model, its DDP/compiled forward, optimizer, scaler, schedule, state).
        batch: the loader's two views.
        step: the global step, for the LR and tau schedules.
        stage: `stage(name)` gives a context manager around each stage ("forward", "backward", "all_reduce",
            "optimizer", "ema"), e.g. the profiler's timer; the default adds no work and no sync.
        forward: in place of the trainer's forward (DDP-wrapped and/or compiled), one that returns a `ByolOutput`
            and names its own stages (the profiler's stage-by-stage forward). DDP does not see it, so under DDP the
            gradients are all-reduced after the backward pass, in the "all_reduce" stage.
        ema: "fused" (the model's `update_target`) or "loop" (the per-parameter reference, for benchmarks).
    """
    if ema not in ("fused", "loop"):
        raise ValueError(f"ema must be 'fused' or 'loop', got {ema!r}")
    t, sched, optimizer, scaler = trainer.cfg.train, trainer.schedule, trainer.optimizer, trainer.scaler
    lr = warmup_cosine_lr(step, sched.peak_lr, sched.warmup_steps, sched.total_steps)
    tau = target_tau(step, t.base_tau, sched.total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(trainer.device, trainer.precision):
        if forward is None:
            with stage("forward"):
                out = trainer.forward(batch.view1, batch.view2)
        else:
            out = forward(batch.view1, batch.view2)
    with stage("backward"):
        scaler.scale(out.loss).backward()
    if forward is not None and trainer.dist.distributed:
        with stage("all_reduce"):
            all_reduce_mean_(trainer.params, trainer.dist.world_size)
    check = t.on_nonfinite if trainer.precision != "fp16" else None
    with stage("optimizer"):
        scaler.unscale_(optimizer)
        norm = grad_norm(trainer.params)
        finite = torch.isfinite(out.loss.detach()) & torch.isfinite(norm)
        skip = check == "skip" and not bool(finite)   # host sync (skip mode only)
        # fp16: the scaler skips the optimizer step iff a gradient is inf/NaN, which is iff their norm is; reading it
        # here costs no extra wait, since `scaler.step` syncs on the same flag a moment later.
        overflow = scaler.is_enabled() and not bool(torch.isfinite(norm))
        if not skip:
            if check == "stop":
                bad = trainer.bad_step
                trainer.bad_step = torch.where(finite | (bad >= 0), bad, torch.full_like(bad, step))
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if skip:
        trainer.state.skipped_steps += 1
        log.warning("step %d: non-finite loss/gradient, step skipped (%d so far)", step, trainer.state.skipped_steps)
        if trainer.state.skipped_steps > t.max_skipped_steps:
            raise NonFiniteError(f"more than train.max_skipped_steps={t.max_skipped_steps} steps were non-finite "
                                 f"(the last at step {step})")
    elif overflow:
        log.debug("step %d: fp16 gradients overflowed; the grad scaler skipped the step and the EMA", step)
        trainer.overflows_in_a_row += 1
        if trainer.overflows_in_a_row > t.max_skipped_steps:
            raise NonFiniteError(f"the fp16 gradients were inf/NaN on {trainer.overflows_in_a_row} steps in a row "
                                 f"(up to step {step}; train.max_skipped_steps={t.max_skipped_steps}): the run has "
                                 "diverged. Lower train.base_lr, or use train.precision=bf16/fp32")
    else:
        trainer.overflows_in_a_row = 0
        with stage("ema"):
            if ema == "fused":
                trainer.model.update_target(tau)
            else:
                ema_update_loop_(trainer.model.ema_pairs(), tau)
    return StepOutput(out.loss.detach(), out.projection, norm, lr, tau)
