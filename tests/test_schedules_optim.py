"""Schedules at their end points; LARS's exclusions and update rule."""
import math

import pytest
import torch
from torch import nn

from byolfast.train.optim import Lars, build_optimizer, param_groups
from byolfast.train.schedules import scaled_lr, target_tau, warmup_cosine_lr


def test_lr_scaling_rule():
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)
    assert scaled_lr(0.2, 256) == pytest.approx(0.2)


def test_warmup_cosine_end_points():
    peak, warm, total = 3.2, 100, 1000
    assert warmup_cosine_lr(0, peak, warm, total) == 0.0
    assert warmup_cosine_lr(50, peak, warm, total) == pytest.approx(peak / 2)
    assert warmup_cosine_lr(warm, peak, warm, total) == pytest.approx(peak)
    assert warmup_cosine_lr(warm + (total - warm) // 2, peak, warm, total) == pytest.approx(peak / 2)
    assert warmup_cosine_lr(total, peak, warm, total) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine_lr(total + 10, peak, warm, total) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine_lr(0, peak, 0, total) == pytest.approx(peak)


def test_tau_end_points():
    assert target_tau(0, 0.996, 1000) == pytest.approx(0.996)
    assert target_tau(500, 0.996, 1000) == pytest.approx(0.998)
    assert target_tau(1000, 0.996, 1000) == pytest.approx(1.0)
    taus = [target_tau(k, 0.99, 100) for k in range(101)]
    assert all(a <= b for a, b in zip(taus, taus[1:]))


def test_param_groups_exclude_ndim_le_1():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decayed, excluded = param_groups(m, 1e-6)
    assert {p.ndim for p in decayed["params"]} == {2, 4}
    assert all(p.ndim <= 1 for p in excluded["params"]) and len(excluded["params"]) == 4
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] and not decayed["lars_exclude"]


def test_lars_matches_reference_formula():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 4))
    b = nn.Parameter(torch.randn(8))
    w.grad, b.grad = torch.randn(8, 4), torch.randn(8)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    lr, wd, eta, mom = 0.5, 1e-2, 1e-3, 0.9
    opt = Lars([{"params": [w], "weight_decay": wd, "lars_exclude": False},
                {"params": [b], "weight_decay": 0.0, "lars_exclude": True}], lr=lr, momentum=mom, eta=eta)
    opt.step()
    u = gw + wd * w0
    trust = eta * w0.norm() / u.norm()
    assert torch.allclose(w.detach(), w0 - lr * trust * u, atol=1e-6)
    assert torch.allclose(b.detach(), b0 - lr * gb, atol=1e-6)   # no decay, no trust ratio
    # second step uses momentum
    w.grad = gw.clone()
    w1 = w.detach().clone()
    opt.step()
    u2 = gw + wd * w1
    buf = mom * (trust * u) + eta * w1.norm() / u2.norm() * u2
    assert torch.allclose(w.detach(), w1 - lr * buf, atol=1e-6)


def test_lars_zero_weight_uses_ratio_one():
    w = nn.Parameter(torch.zeros(3, 3))
    w.grad = torch.ones(3, 3)
    Lars([w], lr=1.0, momentum=0.0).step()
    assert torch.allclose(w.detach(), -torch.ones(3, 3))


def test_lars_gives_each_tensor_its_own_trust_ratio():
    """Many tensors in one group (the ratios are computed together): each gets the formula with its own norms; a zero
    gradient keeps ratio 1 beside tensors that do not."""
    torch.manual_seed(1)
    shapes = [(16, 3, 3, 3), (32, 16), (5, 7), (64, 8, 1, 1), (3, 3)]
    params = [nn.Parameter(torch.randn(s) * (k + 1)) for k, s in enumerate(shapes)]
    grads = [torch.randn(s) * 10 ** -k for k, s in enumerate(shapes)]
    grads[2].zero_()
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    lr, wd, eta = 0.3, 0.0, 2e-3
    Lars([{"params": params, "weight_decay": wd, "lars_exclude": False}], lr=lr, momentum=0.9, eta=eta).step()
    for p0, g, p in zip(before, grads, params):
        ratio = eta * p0.norm() / g.norm() if g.norm() > 0 else torch.tensor(1.0)
        assert torch.allclose(p.detach(), p0 - lr * ratio * g, rtol=1e-6, atol=1e-7)


def test_build_optimizer_rejects_unknown():
    with pytest.raises(ValueError, match="lars"):
        build_optimizer(nn.Linear(2, 2), "adamw", 0.9, 0.0, 1e-3)
    assert not math.isnan(build_optimizer(nn.Linear(2, 2), "sgd", 0.9, 0.0, 1e-3).param_groups[0]["momentum"])
