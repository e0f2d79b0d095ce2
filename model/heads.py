"""BYOL's projector and predictor: two-layer MLPs with BatchNorm in the hidden layer only."""
from __future__ import annotations

from torch import nn


def mlp_head(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    """`Linear(in, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out)`, as in BYOL (no BN on the output)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )
