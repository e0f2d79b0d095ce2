"""Typed configuration of the BYOL model."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """The online/target networks of BYOL.

    Args:
        arch: a torchvision ResNet by name (`resnet18` ... `resnet152`, `wide_resnet50_2`, `wide_resnet101_2`,
            `resnext50_32x4d`, ...).
        small_stem: replace the 7x7/2 stem and max-pool with a 3x3/1 conv (for 32-64 px images).
        projector_hidden, projector_out: the projector MLP `Linear(d, hidden) -> BN -> ReLU -> Linear(hidden, out)`.
        predictor_hidden: the predictor MLP's hidden width (its output is `projector_out`).
        use_predictor: False gives the paper's ablation without predictor (which collapses).
        bn: `sync` (SyncBatchNorm across ranks, the paper's choice) or `local`; irrelevant with one process.
        channels_last: keep activations in `channels_last` memory format (faster convolutions on GPUs and CPUs).
        zero_init_residual: start each residual branch's last BN at zero, so every block starts as the identity (the
            reference's ResNet: haiku's residual blocks initialise their last BatchNorm's scale to zero).
    """

    arch: str = "resnet50"
    small_stem: bool = False
    projector_hidden: int = 4096
    projector_out: int = 256
    predictor_hidden: int = 4096
    use_predictor: bool = True
    bn: str = "sync"
    channels_last: bool = True
    zero_init_residual: bool = True
