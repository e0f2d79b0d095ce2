"""LARS and the parameter groups of BYOL's optimiser.

Based on: the LARS of You et al. (2017) as used by BYOL (DeepMind's `optimizers.py`) and timm's `Lars`: the update
direction of a parameter p with gradient g is `g + wd * p` scaled by the trust ratio `eta * |p| / |g + wd * p|`, then
momentum. Parameters with ndim <= 1 (biases, BatchNorm) get neither weight decay nor the trust ratio.

Kernel launches: CUDA's fused multi-tensor kernels (`torch._foreach_*`) take a list only when corresponding tensors
have the same shape, strides and dtype; otherwise the op falls back to one kernel per tensor. A list of 0-d trust
ratios beside the gradients is such a case, so the ratios are spread over a buffer with one element per gradient
element (one `index_select`), viewed with each gradient's shape and strides. A step is then a fixed sequence of ops
whatever the number of parameter tensors (`tests/test_kernel_count.py` counts them); each multi-tensor op launches
once per few hundred tensors on recent GPUs.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices/kernels (decayed, LARS-adapted) and ndim <= 1 tensors (neither)."""
    adapted, excluded = [], []
    for p in model.parameters():
        if p.requires_grad:
            (excluded if p.ndim <= 1 else adapted).append(p)
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


class SpreadValues:
    """One value per tensor, spread over a flat buffer with as many elements as the tensors together, and seen
    through views with each tensor's shape and strides: a per-tensor factor in the form the fused multi-tensor
    kernels accept (a list of 0-d tensors would not be). The buffer, its views and each element's tensor number are
    built once per layout: per element of the tensors, one value in their dtype and one int32.

    Args:
        like: the tensors the values will multiply (all of one dtype and device).
    """

    def __init__(self, like: Sequence[torch.Tensor]):
        self.layout = _layout(like)
        device = like[0].device
        counts = torch.tensor([t.numel() for t in like], device=device)
        total = sum(t.numel() for t in like)
        self.owner = torch.repeat_interleave(torch.arange(len(like), dtype=torch.int32, device=device), counts,
                                             output_size=total)
        self.values = torch.empty(total, dtype=like[0].dtype, device=device)
        self.views = []
        offset = 0
        for t in like:
            segment = self.values[offset:offset + t.numel()]
            # A dense tensor's strides address exactly its numel() elements, so its segment can take them.
            self.views.append(segment.as_strided(t.shape, t.stride()) if _is_dense(t) else segment.view(t.shape))
            offset += t.numel()

    def fill_(self, per_tensor: torch.Tensor) -> list[torch.Tensor]:
        """Write `per_tensor[i]` into every element of view i (one gather, no host sync); returns the views. The
        values within a segment are all equal, so each view may address its segment in any order of dimensions.
        (A `repeat_interleave` into a temporary and a copy took 8x as long on a CPU.)"""
        torch.index_select(per_tensor.to(self.values.dtype), 0, self.owner, out=self.values)
        return self.views


def _is_dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill its storage span without gaps or overlaps, in any order of dimensions
    (contiguous, channels_last, permuted)."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout(tensors: Sequence[torch.Tensor]) -> tuple:
    """Shapes and strides of `tensors`: what the views of a `SpreadValues` depend on."""
    return tuple((t.shape, t.stride()) for t in tensors)


class Lars(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with momentum, in a fixed number of multi-tensor ops (no per-tensor kernels,
    no host syncs).

    Per parameter: `u = g + wd * p`; `buf = momentum * buf + ratio * u` with `ratio = eta * |p| / (|u| + eps)`
    (1 where either norm is 0, and for groups with `lars_exclude=True`); `p -= lr * buf`. In groups with weight
    decay the gradients are overwritten with `u` (as APEX's LARC does), which spares a gradient-sized allocation per
    step. Parameters are handled in one set of ops per (device, dtype).

    Args:
        params: parameters or groups; a group with `lars_exclude=True` skips the trust ratio.
        lr: learning rate (set per step by the trainer).
        momentum: heavy-ball momentum.
        weight_decay: L2 term added to the gradient before the trust ratio.
        eta: trust coefficient.
        eps: guards the ratio's denominator.
    """

    def __init__(self, params: Iterable, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 1e-3, eps: float = 1e-9):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError("Lars: lr, momentum, weight_decay must be >= 0 and eta > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)
        self._spread: dict[tuple, SpreadValues] = {}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._spread = {}   # not part of the state: rebuilt from the parameters on the next step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            kinds: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is not None:
                    kinds.setdefault((p.device, p.dtype), []).append(p)
            for kind, params in kinds.items():
                self._update(group, params, (index, *kind))
        return loss

    def _update(self, group: dict, params: list, key: tuple) -> None:
        grads = [p.grad for p in params]
        bufs = momentum_buffers(self, params)
        if group["weight_decay"] != 0:
            torch._foreach_add_(grads, params, alpha=group["weight_decay"])
        torch._foreach_mul_(bufs, group["momentum"])
        if group["lars_exclude"]:
            torch._foreach_add_(bufs, grads)
        else:
            # All trust ratios as one vector: the norms of the weights and of the updates in one multi-tensor op.
            pn, un = torch.stack(torch._foreach_norm([*params, *grads])).chunk(2)
            ratios = torch.where((pn > 0) & (un > 0), group["eta"] * pn / (un + group["eps"]), 1.0)
            spread = self._spread.get(key)
            if spread is None or spread.layout != _layout(grads):
                spread = self._spread[key] = SpreadValues(grads)
            torch._foreach_addcmul_(bufs, grads, spread.fill_(ratios))
        torch._foreach_add_(params, bufs, alpha=-group["lr"])


def momentum_buffers(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's `momentum_buffer` in the optimizer's state, created as zeros on first use."""
    bufs = []
    for p in params:
        state = optimizer.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        bufs.append(state["momentum_buffer"])
    return bufs


@torch.no_grad()
def lars_step_per_tensor_(optimizer: Lars) -> None:
    """The same LARS step with the trust ratios applied as a list of 0-d tensors (`_foreach_mul` falls back to one
    kernel per tensor on GPUs): the reference for tests and benchmarks."""
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params]
        if group["weight_decay"] != 0:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        if not group["lars_exclude"]:
            pn = torch.stack(torch._foreach_norm(params))
            un = torch.stack(torch._foreach_norm(grads))
            ratios = torch.where((pn > 0) & (un > 0), group["eta"] * pn / (un + group["eps"]), 1.0)
            grads = torch._foreach_mul(grads, list(ratios.unbind()))
        bufs = momentum_buffers(optimizer, params)
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads)
        torch._foreach_add_(params, bufs, alpha=-group["lr"])


def build_optimizer(model: nn.Module, name: str, momentum: float, weight_decay: float, eta: float) -> torch.optim.Optimizer:
    """LARS (the paper) or momentum SGD over the two parameter groups of `param_groups`."""
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return Lars(groups, lr=0.0, momentum=momentum, eta=eta)
    if name == "sgd":
        for g in groups:
            g.pop("lars_exclude")
        return torch.optim.SGD(groups, lr=0.0, momentum=momentum)
    raise ValueError(f"train.optimizer must be 'lars' or 'sgd', got {name!r}")
