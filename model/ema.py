"""The target network's exponential moving average, as one fused multi-tensor update.

Based on: timm's `ModelEmaV3` (a single `torch._foreach_lerp_` over all floating-point tensors). BYOL's update is
`xi <- tau * xi + (1 - tau) * theta`, i.e. `lerp(xi, theta, 1 - tau)`. BatchNorm running statistics are copied from
the online network, which is what the reference implementation's target ends up using (it never evaluates the target
in eval mode during training); non-float buffers (`num_batches_tracked`) are copied too.
"""
from __future__ import annotations

import torch
from torch import nn


class EmaPairs:
    """The matched tensors of an online module and its target copy, collected once.

    Collecting the lists once keeps the per-step update free of Python loops over modules.
    """

    def __init__(self, online: nn.Module, target: nn.Module):
        online_params = dict(online.named_parameters())
        target_params = dict(target.named_parameters())
        if online_params.keys() != target_params.keys():
            raise ValueError("online and target modules differ in parameters")
        self.online_params = [online_params[k].detach() for k in online_params]
        self.target_params = [target_params[k].detach() for k in online_params]
        online_buffers = dict(online.named_buffers())
        target_buffers = dict(target.named_buffers())
        self.online_buffers = [online_buffers[k] for k in online_buffers]
        self.target_buffers = [target_buffers[k] for k in online_buffers]
        # One list per (device, dtype): a `_foreach_` call over mixed dtypes (float statistics and int64
        # `num_batches_tracked`) or devices leaves the fused path for one kernel per tensor.
        self.param_groups = _by_device_and_dtype(self.target_params, self.online_params)
        self.buffer_groups = _by_device_and_dtype(self.target_buffers, self.online_buffers)


def _by_device_and_dtype(dst: list[torch.Tensor], src: list[torch.Tensor]) -> list[tuple[list, list]]:
    """`(dst, src)` sub-lists, one per (device, dtype) of `dst`, in first-seen order."""
    groups: dict[tuple, tuple[list, list]] = {}
    for d, s in zip(dst, src):
        dsts, srcs = groups.setdefault((d.device, d.dtype), ([], []))
        dsts.append(d)
        srcs.append(s)
    return list(groups.values())


@torch.no_grad()
def ema_update_(pairs: EmaPairs, tau: float | torch.Tensor) -> None:
    """Fused in-place update: every target parameter moves toward its online twin by `1 - tau`; buffers are copied.
    One `_foreach_lerp_` and one `_foreach_copy_` per (device, dtype), whatever the number of tensors."""
    weight = 1.0 - tau
    for dst, src in pairs.param_groups:
        torch._foreach_lerp_(dst, src, weight)
    for dst, src in pairs.buffer_groups:
        torch._foreach_copy_(dst, src)


@torch.no_grad()
def ema_update_loop_(pairs: EmaPairs, tau: float) -> None:
    """The naive per-parameter formula `xi = tau * xi + (1 - tau) * theta` (reference for tests and benchmarks)."""
    for t, o in zip(pairs.target_params, pairs.online_params):
        t.mul_(tau).add_(o, alpha=1.0 - tau)
    for t, o in zip(pairs.target_buffers, pairs.online_buffers):
        t.copy_(o)
