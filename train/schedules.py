"""Schedules as pure functions of the step (DeepMind BYOL's `learning_schedule` and `target_ema`)."""
from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the paper: lr = base_lr * batch / 256."""
    return base_lr * global_batch / 256.0


def warmup_cosine_lr(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def target_tau(step: int, base_tau: float, total_steps: int) -> float:
    """tau_k = 1 - (1 - base_tau) * (cos(pi k / K) + 1) / 2: base_tau at k = 0, rising to 1 at k = K."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base_tau) * (math.cos(math.pi * progress) + 1.0) / 2.0
