"""The BYOL model: loss, fused EMA, collapse monitor, encoder export into torchvision."""
import math

import pytest
import torch
import torchvision
from torch import nn

from byolfast.model import ModelConfig, build_byol, collapse_std, ema_update_loop_, regression_loss
from byolfast.model.ema import EmaPairs
from byolfast.model.resnet import build_encoder, encoder_state_dict

TINY = ModelConfig(arch="resnet18", small_stem=True, projector_hidden=64, predictor_hidden=64, projector_out=32)


def test_regression_loss_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    assert torch.allclose(regression_loss(a, b), torch.tensor([0.0, 2.0, 4.0]))
    # float32 even from bf16 inputs
    assert regression_loss(a.bfloat16(), b.bfloat16()).dtype == torch.float32


def test_loss_is_symmetrised_and_targets_get_no_gradient():
    torch.manual_seed(0)
    m = build_byol(TINY)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    out = m(x1, x2)
    out.loss.backward()
    assert all(p.grad is None for p in m.target.parameters())
    assert all(p.grad is not None for p in m.predictor.parameters())
    m.zero_grad()
    # Swapping the views gives the same symmetrised loss (BN in train mode uses per-view statistics).
    assert torch.allclose(m(x2, x1).loss, m(x1, x2).loss, atol=1e-5)
    assert 0.0 <= out.loss.item() <= 8.0


def test_heads_match_the_paper():
    m = build_byol(ModelConfig(arch="resnet18"))
    proj = m.online["projector"]
    assert [type(l).__name__ for l in proj] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert proj[0].in_features == 512 and proj[0].out_features == 4096 and proj[3].out_features == 256
    assert m.predictor[0].in_features == 256 and m.predictor[3].out_features == 256
    assert not any(p.requires_grad for p in m.target.parameters())


def test_fused_ema_equals_naive_formula():
    torch.manual_seed(0)
    a, b = build_byol(TINY), build_byol(TINY)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in a.online.parameters():
            p.add_(torch.randn_like(p))
        for buf in a.online.buffers():
            if buf.is_floating_point():
                buf.add_(1.0)
    b.online.load_state_dict(a.online.state_dict())
    tau = 0.996
    expected = {k: tau * v + (1 - tau) * a.online.state_dict()[k] for k, v in a.target.named_parameters()}
    a.update_target(tau)
    ema_update_loop_(EmaPairs(b.online, b.target), tau)
    for k, v in a.target.named_parameters():
        assert torch.allclose(v, expected[k], atol=1e-6), k
        assert torch.allclose(v, dict(b.target.named_parameters())[k], atol=1e-6), k
    for (k, v), (_, o) in zip(a.target.named_buffers(), a.online.named_buffers()):
        assert torch.equal(v, o), f"buffer {k} not copied"


def test_ema_tau_one_keeps_target_and_zero_copies_online():
    m = build_byol(TINY)
    with torch.no_grad():
        for p in m.online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.target.parameters()]
    m.update_target(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, m.target.parameters()))
    m.update_target(0.0)
    assert all(torch.allclose(t, o) for t, o in zip(m.target.parameters(), m.online.parameters()))


def test_ema_pairs_follow_a_device_or_dtype_move():
    m = build_byol(TINY)
    m.update_target(0.5)
    m.double()
    m.update_target(0.5)   # would raise on mismatched dtypes if the cached pairs were stale
    assert next(m.target.parameters()).dtype == torch.float64


def test_collapse_std_detects_collapse():
    torch.manual_seed(0)
    spread = torch.randn(512, 64)
    collapsed = torch.ones(512, 64) + 1e-4 * torch.randn(512, 64)
    assert collapse_std(spread).item() == pytest.approx(1.0, abs=0.1)
    assert collapse_std(collapsed).item() < 0.01


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_encoder_state_dict_loads_into_torchvision(arch):
    enc, dim = build_encoder(arch)
    sd = encoder_state_dict(enc)
    assert not any(k.startswith("fc.") for k in sd)
    tv = getattr(torchvision.models, arch)()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    enc.eval(), tv.eval()
    assert torch.allclose(enc(x), tv(x), atol=1e-5) and enc(x).shape == (2, dim)


def test_channels_last_and_bf16_autocast_forward():
    m = build_byol(TINY)
    assert m.online["encoder"].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, x.flip(-1))
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="unknown model.arch"):
        build_encoder("resnet7")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_global_batchnorm_alone_is_torchs_batchnorm(momentum):
    """In one process GlobalBatchNorm is torch's BatchNorm, running statistics included (momentum=None: the
    cumulative average)."""
    from byolfast.model.syncbn import convert_global_batchnorm

    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4, momentum=momentum)
    ours = convert_global_batchnorm(nn.BatchNorm2d(4, momentum=momentum))
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3) * 3 + 1
        assert torch.allclose(ours(x), ref(x), atol=1e-6)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ours, name).float(), getattr(ref, name).float(), atol=1e-6), name


def test_effective_rank_counts_the_spread_dimensions():
    from byolfast.train.evaluate import effective_rank
    g = torch.Generator().manual_seed(0)
    iso = torch.randn(4000, 16, generator=g)
    assert 15.0 < effective_rank(iso) <= 16.0                       # spread evenly over 16 dims
    line = torch.randn(500, 1, generator=g) * torch.randn(1, 16, generator=g)
    assert effective_rank(line) < 1.01                              # every sample on one line
    two = iso[:, :2] @ torch.randn(2, 16, generator=g)
    assert 1.2 < effective_rank(two) < 2.01                         # a plane: at most 2
