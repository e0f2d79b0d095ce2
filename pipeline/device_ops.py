"""The batched colour ops of `pipeline.device_augment`, one function per op, on float [0, 1] (N, 3, H, W) images.

Each op takes its per-sample parameters as (N,) tensors and keeps the input's memory format: a channels_last batch
stays channels_last through every op (elementwise passes, per-channel reductions, and the HSV round trip stacked on
the last axis), so the engine never copies a batch only to change its layout. The maths and the sources they follow
are described in `pipeline.device_augment`'s docstring.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from byolfast.pipeline.augment_spec import BLUR_TRUNCATE, JITTER_ORDERS, SLOTS_AFTER_HUE, SLOTS_BEFORE_HUE
from byolfast.pipeline.augment_spec import LUMA as _LUMA

def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of float (N, 3, H, W) images as (N, 1, H, W), torchvision's weights and order of operations."""
    r, g, b = x.unbind(dim=1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    # torchvision's _blend with a per-sample ratio; ratio 1 returns x exactly (x * 1 + other * 0).
    ratio = _per_sample(ratio)
    return (x * ratio).add_(other * (1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample `F.adjust_brightness` of float [0, 1] images; factor (N,). Factor 1 is the identity."""
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample `F.adjust_contrast`: blend with the mean of each image's grayscale. Factor 1 is the identity."""
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Per-sample `F.adjust_saturation`: blend with each image's grayscale. Factor 1 is the identity."""
    return _blend(x, rgb_to_grayscale(x), factor)


def add_brightness(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The reference's brightness: x + delta per sample (N,), clipped to [0, 1]. Delta 0 is the identity."""
    return (x + _per_sample(delta)).clamp_(0.0, 1.0)


def channel_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The reference's contrast: blend each channel with its own mean over the image, (x - m_c) f + m_c written as
    x f + m_c (1 - f), clipped to [0, 1]. Factor 1 is the identity."""
    f = _per_sample(factor)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return torch.addcmul(mean * (1.0 - f), x, f).clamp_(0.0, 1.0)


def hsv_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The reference's saturation: HSV saturation S -> clip(S * f, 0, 1), H and V kept, per sample (N,), in closed
    form: out_c = V - (V - x_c) g, g = clip(f, 0, V / (V - min)). Grey pixels stay as they are."""
    minc, maxc = torch.aminmax(x, dim=1, keepdim=True)
    chroma = maxc - minc
    limit = maxc / torch.where(chroma > 0, chroma, torch.ones_like(chroma))   # 1 / S; grey pixels: any finite value
    g = torch.minimum(_per_sample(factor.clamp(min=0.0)), limit)
    return (maxc - x).mul_(g).neg_().add_(maxc).clamp_(0.0, 1.0)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    # torchvision.transforms.v2.functional._color._rgb_to_hsv on (N, 3, H, W), as (N, H, W, 3): the channel axis last,
    # so that a channels_last batch stays channels_last (stacking on dim 1 would lay the result out as NCHW).
    r, g, _ = x.unbind(dim=1)
    minc, maxc = torch.aminmax(x, dim=1)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, channels_range).unsqueeze(1)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / divisor).unbind(dim=1)
    maxc_neq_r = maxc != r
    maxc_eq_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(maxc_eq_g & maxc_neq_r)
    hr = bc.sub(gc).mul_(~maxc_neq_r)
    hb = gc.add(4.0).sub_(rc).mul_(maxc_neq_r & ~maxc_eq_g)
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-1)


def _hsv_to_rgb(hsv: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    # torchvision's _hsv_to_rgb on (N, H, W, 3); `select` is its (3, 6) table mapping the hue sextant to (v, p, q, t)
    # per channel. Returns (N, 3, H, W) as a channels_last view of the (N, H, W, 3) result.
    h, s, v = hsv.unbind(dim=-1)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(torch.int64).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-1)
    index = select[:, i].movedim(0, -1)  # (3, N, H, W) -> (N, H, W, 3)
    return vpqt.gather(-1, index).permute(0, 3, 1, 2)


_HSV_SELECT = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample `F.adjust_hue`: rotate the HSV hue by `shift` (N,) turns, in float32."""
    if select is None:
        select = torch.tensor(_HSV_SELECT, dtype=torch.int64, device=x.device)
    hsv = _rgb_to_hsv(x)
    hsv[..., 0] = hsv[..., 0].add(shift.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(hsv, select)


# The single jitter ops of each maths (`color_ops`); `BatchedViewAugment` fuses them (see its `_jitter`).
JITTER_FUNCTIONS = {
    "deepmind": {"brightness": add_brightness, "contrast": channel_contrast, "saturation": hsv_saturation,
                 "hue": adjust_hue},
    "torchvision": {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation,
                    "hue": adjust_hue},
}


def _order_code(order: torch.Tensor) -> torch.Tensor:
    # A jitter order (n, 4) as the base-4 number of its op ids: a row of `_slot_table`.
    return ((order[:, 0] * 4 + order[:, 1]) * 4 + order[:, 2]) * 4 + order[:, 3]


def _slot_table() -> torch.Tensor:
    # (256, 6): per order code, the spec's slots before the hue and after it (-1 where nothing runs, and for codes
    # that are no permutation).
    table = torch.full((256, 6), -1, dtype=torch.int64)
    for order, before, after in zip(JITTER_ORDERS, SLOTS_BEFORE_HUE, SLOTS_AFTER_HUE):
        table[_order_code(torch.tensor([order]))] = torch.tensor(before + after)
    return table


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(N, K) normalised 1-D gaussian kernels, torchvision's construction (`_get_gaussian_kernel1d`) per sigma, with
    the taps beyond the spec's cut (`augment_spec.blur_radius`: ceil(4 sigma) from the centre) set to 0."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    xs = torch.linspace(-lim, lim, steps=kernel_size, dtype=sigma.dtype, device=sigma.device)
    logits = xs.unsqueeze(0).div(sigma.unsqueeze(1)).pow(2).neg()
    offsets = torch.arange(kernel_size, device=sigma.device) - kernel_size // 2
    cut = offsets.abs().unsqueeze(0) > torch.ceil(sigma.float() * BLUR_TRUNCATE).unsqueeze(1)
    return torch.softmax(logits.masked_fill(cut, -math.inf), dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample separable gaussian blur of (N, C, H, W) with reflect padding, as `F.gaussian_blur`.

    Each 1-D pass is a sum of `kernel_size` shifted views of the padded batch, each weighted by its sample's tap
    (`addcmul`): elementwise passes keep x's memory format, where a grouped convolution would need the batch folded
    into the channels, a layout a channels_last batch can only reach by a copy.
    """
    pad = kernel_size // 2
    taps = gaussian_kernels(sigma, kernel_size).to(x.dtype).unsqueeze(-1).unsqueeze(-1).unsqueeze(-1)  # (N, K, 1,1,1)
    hgt, wid = x.shape[-2:]
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    if y.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)   # a no-op where pad kept the format
    v = y[:, :, 0:hgt, :] * taps[:, 0]
    for k in range(1, kernel_size):
        v.addcmul_(y[:, :, k:k + hgt, :], taps[:, k])
    out = v[..., 0:wid] * taps[:, 0]
    for k in range(1, kernel_size):
        out.addcmul_(v[..., k:k + wid], taps[:, k])
    return out


def solarize(x: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """`F.solarize` (x >= threshold -> 1 - x) on the samples where `mask` (N,) is set."""
    return torch.where(_per_sample(mask) & (x >= threshold), 1.0 - x, x)
