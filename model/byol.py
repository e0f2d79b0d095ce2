"""BYOL (Grill et al., 2020): an online network predicts the target network's projection of another view.

online:  x -> encoder f_theta -> projector g_theta -> predictor q_theta -> q
target:  x -> encoder f_xi    -> projector g_xi                         -> z'   (no gradients; EMA of online)
loss:    2 - 2 cos(q(v1), sg(z'(v2))) + 2 - 2 cos(q(v2), sg(z'(v1))), per sample, averaged over the batch.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from byolfast.model.config import ModelConfig
from byolfast.model.ema import EmaPairs, ema_update_
from byolfast.model.heads import mlp_head
from byolfast.model.resnet import build_encoder


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample `2 - 2 cos(p, t)` on L2-normalised vectors, in float32 whatever the autocast dtype."""
    p = F.normalize(prediction.float(), dim=-1)
    t = F.normalize(target.float(), dim=-1)
    return 2.0 - 2.0 * (p * t).sum(dim=-1)


class ByolOutput(NamedTuple):
    loss: torch.Tensor           # scalar, symmetrised, mean over the batch
    projection: torch.Tensor     # online projections of view 1 (detached), for the collapse monitor


class Byol(nn.Module):
    """The online network, its predictor and the target network, with the symmetrised BYOL loss.

    `forward(view1, view2)` runs the online network on both views and the target network (in training mode, on its
    own batch statistics, without gradients) on both views. Call `update_target(tau)` after each optimizer step.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        encoder, dim = build_encoder(cfg.arch, cfg.small_stem, cfg.zero_init_residual)
        self.online = nn.ModuleDict({"encoder": encoder,
                                     "projector": mlp_head(dim, cfg.projector_hidden, cfg.projector_out)})
        self.predictor = (mlp_head(cfg.projector_out, cfg.predictor_hidden, cfg.projector_out)
                          if cfg.use_predictor else nn.Identity())
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)
        self.feature_dim = dim
        self._ema_pairs: EmaPairs | None = None

    # --- the two networks -------------------------------------------------------------------------------------
    def online_projection(self, x: torch.Tensor) -> torch.Tensor:
        return self.online["projector"](self.online["encoder"](x))

    @torch.no_grad()
    def target_projection(self, x: torch.Tensor) -> torch.Tensor:
        return self.target["projector"](self.target["encoder"](x))

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> ByolOutput:
        # Each view goes through each network on its own, so BatchNorm normalises with one view's statistics,
        # as in the reference implementation (a concatenated batch would mix the two views' statistics).
        z1, z2 = self.online_projection(view1), self.online_projection(view2)
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            self.target.train(self.training)
            t1, t2 = self.target_projection(view1), self.target_projection(view2)
        # q(v1) predicts z'(v2) and q(v2) predicts z'(v1).
        loss = regression_loss(q1, t2) + regression_loss(q2, t1)
        return ByolOutput(loss.mean(), z1.detach())

    # --- the target's EMA -------------------------------------------------------------------------------------
    def update_target(self, tau: float | torch.Tensor) -> None:
        """Fused EMA step of the target towards the online network (BN statistics copied)."""
        ema_update_(self.ema_pairs(), tau)

    def ema_pairs(self) -> EmaPairs:
        """The matched online/target tensors, collected once (again after a move or cast of the module)."""
        if self._ema_pairs is None:
            self._ema_pairs = EmaPairs(self.online, self.target)
        return self._ema_pairs

    def _apply(self, fn, recurse=True):
        # Moving or casting the module re-creates tensors: drop the cached pairs so they are collected again.
        self._ema_pairs = None
        return super()._apply(fn, recurse)

    @property
    def encoder(self) -> nn.Module:
        return self.online["encoder"]


def collapse_std(projections: torch.Tensor) -> torch.Tensor:
    """Per-dimension std of L2-normalised projections, times sqrt(d): ~1 when spread out, -> 0 when collapsed."""
    z = F.normalize(projections.float(), dim=-1)
    return z.std(dim=0).mean() * (z.shape[-1] ** 0.5)


def build_byol(cfg: ModelConfig, distributed: bool = False, device_type: str = "cuda") -> Byol:
    """The BYOL model, in channels_last when asked, with global-batch BatchNorm when `distributed` and
    `cfg.bn == 'sync'`: `torch.nn.SyncBatchNorm` on GPUs, `GlobalBatchNorm` (an all-reduce of the moments) elsewhere.
    The target network's BN is converted too, so it also normalises with the global batch of its view."""
    if cfg.bn not in ("sync", "local"):
        raise ValueError(f"model.bn must be 'sync' or 'local', got {cfg.bn!r}")
    model = Byol(cfg)
    if distributed and cfg.bn == "sync":
        if device_type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            from byolfast.model.syncbn import convert_global_batchnorm
            model = convert_global_batchnorm(model)
        model.target.requires_grad_(False)   # the converted BN layers' parameters are new
        model._ema_pairs = None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
