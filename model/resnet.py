"""ResNet encoders from torchvision, without the classifier, optionally with a small-image stem."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2",
           "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")


def build_encoder(arch: str, small_stem: bool = False, zero_init_residual: bool = False) -> tuple[nn.Module, int]:
    """A torchvision ResNet with `fc` replaced by identity; returns (encoder, feature dimension).

    The state_dict keys are torchvision's own (`conv1.weight`, `layer1.0.bn1.running_mean`, ...), so an exported
    encoder loads into `torchvision.models.<arch>()` with only `fc.*` missing.

    Args:
        arch: torchvision model name, one of `RESNETS`.
        small_stem: 3x3 stride-1 first conv and no max-pool, the usual stem for 32-64 px images (CIFAR-style).
        zero_init_residual: zero-initialise the last BN of each residual branch.
    """
    if arch not in RESNETS:
        raise ValueError(f"unknown model.arch {arch!r}: choose one of {', '.join(RESNETS)}")
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    if small_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return net, dim


def encoder_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights under torchvision's key names (no `fc`), on the CPU, ready for `torch.save`."""
    return {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items() if not k.startswith("fc.")}
