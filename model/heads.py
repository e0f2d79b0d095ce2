"""BYOL's projector and predictor: two-layer MLPs with BatchNorm in the hidden layer only.

Based on: DeepMind's BYOL `networks.MLP` (`hk.Linear(hidden) -> BatchNorm -> relu -> hk.Linear(out, with_bias=False)`).
"""
from __future__ import annotations

from torch import nn


def mlp_head(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    """`Linear(in, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out, bias=False)`, as in BYOL: no BN on the
    output, and no bias there either (the output is L2-normalised by the loss, so a bias would only shift it)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False),
    )
