"""BatchNorm over the global batch of all ranks, for any device and process-group backend.

`torch.nn.SyncBatchNorm` is the fast path on GPUs (NCCL); it refuses CPU tensors. `GlobalBatchNorm` computes the same
statistics with one autograd-aware all-reduce of (sum, sum of squares, count) per layer, so a gloo job on CPUs trains
with the same global-batch BN, and its gradients flow through the statistics as in SyncBatchNorm.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm1d/2d whose training statistics span every rank's batch (mean and biased var over N*world)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)   # torch's own BatchNorm (momentum=None: the cumulative average, as there)
        from torch.distributed.nn.functional import all_reduce

        dtype = x.dtype
        xf = x.float()
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([xf.numel() / xf.shape[1]], device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        stats = all_reduce(stats)                     # sum over ranks, differentiable
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                # momentum=None: the cumulative average, as torch's BatchNorm (a device scalar, no sync)
                m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.float()
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer by a `GlobalBatchNorm` holding the same parameters and buffers."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_global_batchnorm(child))
    return module
