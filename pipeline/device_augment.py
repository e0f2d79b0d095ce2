"""BYOL's colour augmentation of one view as batched tensor ops on the device, every random choice drawn per sample.

Backends that crop (and possibly flip) elsewhere, e.g. FFCV, hand this module uint8 crops; it draws the per-sample
parameters of colour jitter (in a random order per sample), grayscale, gaussian blur and solarisation, applies them in
float32 with no per-sample Python loop, and normalises.

Colour jitter has two sets of maths (`AugmentConfig.color_ops`), the same four ops in the same per-sample order:
  - `deepmind`, the default: the paper's, as DeepMind's BYOL reference writes it (deepmind-research,
    `byol/utils/augmentations.py`, `_color_transform_single_image`), on [0, 1] pixels:
      brightness  x + delta, delta uniform in [-b, b] (additive; the same delta on every channel);
      contrast    (x - m_c) * f + m_c, m_c the mean of channel c over the image, f uniform in [1 - c, 1 + c];
      saturation  HSV (TF's rgb_to_hsv) with S -> clip(S * f, 0, 1), back to RGB; f uniform in [1 - s, 1 + s];
      hue         HSV with H -> (H + delta) mod 1, delta uniform in [-h, h] turns;
    each op is followed by a clip to [0, 1]; the four run in a uniform random order per sample (`shuffle=True`);
    an op of strength 0 is skipped; grayscale (luma 0.2989 R + 0.587 G + 0.114 B on all three channels) runs after
    the jitter, then a final clip. The reference's lower bounds are 1 - s, not clamped at 0 (they differ from
    torchvision's only for strengths above 1). Its saturation is computed here in closed form,
    out_c = V - (V - x_c) * clip(f, 0, V / (V - min)), V the channel maximum: the HSV round trip with S scaled, as
    the hue, V and the channels' order are kept.
  - `torchvision`: `torchvision.transforms.v2.functional` (adjust_brightness/contrast/saturation/hue) op for op, so
    the torchvision backend and this one sample the same distribution: brightness x * f, contrast and saturation
    blends with the mean of the grayscale image and with the grayscale image, factors in [max(0, 1 - s), 1 + s].
The hue is the same HSV shift in both. Grayscale, blur, solarize and normalise follow torchvision's functional ops
(rgb_to_grayscale, gaussian_blur, solarize, normalize). The draws are one table for both (`augment_spec.DRAWS`):
the brightness column u gives torchvision's factor max(0, 1 - b) + u (1 + b - max(0, 1 - b)) or the reference's delta
2 b u - b, which for b <= 1 is that factor minus 1: a seed draws the same views' randomness under either maths.

With torchvision's maths, brightness, saturation, grayscale, solarize and hue follow torchvision's float32 maths
step for step; contrast (one fused blend per slot, the batched mean's reduction order) and blur (two separable 1-D
passes with per-sample kernels, the same reflect padding and kernel) differ in float rounding only. The tests hold each
op to atol 1e-6 and chains to 2e-6, against torchvision or a float64 transcription of the reference's formulas.

The op order, the table of draws and the jitter orders are `pipeline.augment_spec`'s: `apply` runs the spec's ops
after the crop (`STAGES`) in its order, `sample_params` reads the draws from the spec's columns.
On the CPU, `forward` hands the same draws to the per-pixel kernels of `pipeline.cpu_augment` (`apply_cpu`), where
each sample runs only its own ops; `apply` stays the reference they are tested against.

Host-device syncs: none in `forward`/`sample_params`/`apply`. Every probability is a mask applied with `torch.where`
or folded into a factor, never a Python branch on a tensor value; a sample that is not blurred still goes through the
convolution (a data-dependent subset would need a sync to size it). Give `forward` a generator on the same device as
the images, and move the module there, or each call copies the draws / constants across.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from byolfast.pipeline.augment_spec import LUMA as _LUMA
from byolfast.pipeline.augment_spec import (BRIGHTNESS, CONTRAST, DRAWS, HUE, JITTER_ORDERS, NUM_COLUMNS, OPS,
                                            SATURATION, SLOTS_AFTER_HUE, SLOTS_BEFORE_HUE, blur_kernel_size,
                                            draw_range, jitter_ranges)
from byolfast.pipeline.config import ViewSpec

__all__ = ["BRIGHTNESS", "CONTRAST", "SATURATION", "HUE", "JITTER_FUNCTIONS", "STAGES", "BatchedViewAugment",
           "add_brightness", "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation",
           "blur_kernel_size", "channel_contrast", "gaussian_blur", "gaussian_kernels", "hsv_saturation",
           "jitter_ranges", "rgb_to_grayscale", "solarize"]   # with the spec's names that callers import from here

# The spec's ops this engine runs, one pass each, in the spec's order (the crop is done upstream).
STAGES = tuple((name,) for name in OPS if name != "crop")

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
    # torchvision.transforms.v2.functional._color._rgb_to_hsv on (N, 3, H, W).
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
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(hsv: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    # torchvision's _hsv_to_rgb; `select` is its (3, 6) table mapping the hue sextant to (v, p, q, t) per channel.
    h, s, v = hsv.unbind(dim=1)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(torch.int64).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=1)
    index = select[:, i].movedim(0, 1)  # (3, N, H, W) -> (N, 3, H, W)
    return vpqt.gather(1, index)


_HSV_SELECT = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample `F.adjust_hue`: rotate the HSV hue by `shift` (N,) turns, in float32."""
    if select is None:
        select = torch.tensor(_HSV_SELECT, dtype=torch.int64, device=x.device)
    hsv = _rgb_to_hsv(x)
    h = hsv[:, 0].add(shift.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1), select)


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
    """(N, K) normalised 1-D gaussian kernels, torchvision's construction (`_get_gaussian_kernel1d`) per sigma."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    xs = torch.linspace(-lim, lim, steps=kernel_size, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax(xs.unsqueeze(0).div(sigma.unsqueeze(1)).pow(2).neg(), dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample separable gaussian blur of (N, C, H, W) with reflect padding, as `F.gaussian_blur`.

    One grouped convolution per axis over the N*C channels, each channel with its sample's kernel.
    """
    n, c, hgt, wid = x.shape
    pad = kernel_size // 2
    kern = gaussian_kernels(sigma, kernel_size).repeat_interleave(c, dim=0)  # (N*C, K)
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, hgt + 2 * pad, wid + 2 * pad)
    y = F.conv2d(y, kern.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(y, kern.view(n * c, 1, 1, kernel_size), groups=n * c)
    return y.view(n, c, hgt, wid)


def solarize(x: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """`F.solarize` (x >= threshold -> 1 - x) on the samples where `mask` (N,) is set."""
    return torch.where(_per_sample(mask) & (x >= threshold), 1.0 - x, x)


class BatchedViewAugment(torch.nn.Module):
    """One BYOL view's colour augmentation (and optional flip) of a batch of crops, per-sample draws, on x's device.

    Args:
        spec: the view's distribution; its crop fields are not used here (the crop is done upstream).
        mean, std: normalisation applied last, per channel, on [0, 1] pixels.
        image_size: side of the square crops; sets the blur kernel (`blur_kernel_size`).
        apply_flip: also draw and apply the horizontal flip (when the upstream crop did not flip).
        cpu_kernels: run CPU inputs through `pipeline.cpu_augment`'s per-pixel kernels (False: the batched passes
            everywhere, the reference the kernels are tested against).
        color_ops: the maths of colour jitter, `deepmind` (the paper's) or `torchvision` (see the module's doc).
    """

    def __init__(self, spec: ViewSpec, mean: Sequence[float], std: Sequence[float], image_size: int,
                 apply_flip: bool = False, cpu_kernels: bool = True, color_ops: str = "deepmind"):
        super().__init__()
        self.ranges = jitter_ranges(spec, color_ops)   # checks color_ops
        self.color_ops = color_ops
        if not 0.0 <= spec.hue <= 0.5:
            raise ValueError(f"hue jitter {spec.hue} must lie in [0, 0.5] (a fraction of the hue circle)")
        if spec.blur_sigma[0] <= 0 or spec.blur_sigma[1] < spec.blur_sigma[0]:
            raise ValueError(f"blur_sigma {spec.blur_sigma} must be an increasing pair of positive numbers")
        self.spec = spec
        self.image_size = image_size
        self.apply_flip = apply_flip
        self.cpu_kernels = cpu_kernels
        self.kernel_size = blur_kernel_size(image_size, spec.blur_kernel_frac)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("hsv_select", torch.tensor(_HSV_SELECT, dtype=torch.int64), persistent=False)
        self.register_buffer("slot_table", _slot_table(), persistent=False)

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, kernel_size={self.kernel_size}, apply_flip={self.apply_flip}, "
                f"color_ops={self.color_ops}")

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: uint8 images already cropped to image_size, (N,H,W,3) NHWC or (N,3,H,W), on any device.

        Returns float32 normalised (N,3,H,W) in channels_last memory format on x's device. On the CPU (with
        `cpu_kernels`) the per-pixel kernels of `pipeline.cpu_augment` run instead of the batched passes: the same
        draws, the same result within float rounding, several times faster there.
        """
        params = self.sample_params(x.shape[0], x.device, generator)
        if x.device.type == "cpu" and self.cpu_kernels:
            return self.apply_cpu(x, params)
        return self.apply(self.to_float01(x), params)

    def apply_cpu(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """`apply` for uint8 crops on the CPU: each sample runs only its own ops (`pipeline.cpu_augment`'s stages),
        the blur only on the samples that draw it. x: uint8 (N, S, S, 3) or (N, 3, S, S). Returns float32
        channels_last."""
        from byolfast.pipeline import cpu_augment

        return cpu_augment.augment_crops(self._nchw_uint8(x), params, self.spec, self.color_ops, self.apply_flip,
                                         self.kernel_size, self.mean.flatten().numpy(), self.std.flatten().numpy())

    def _nchw_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC or NCHW crops as an (N, 3, S, S) view (NHWC input becomes a channels_last view)."""
        if x.dtype != torch.uint8:
            raise TypeError(f"expected uint8 crops, got {x.dtype}")
        s = self.image_size
        if x.ndim == 4 and tuple(x.shape[1:]) == (s, s, 3):
            return x.permute(0, 3, 1, 2)
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"expected (N, {s}, {s}, 3) or (N, 3, {s}, {s}) crops, got {tuple(x.shape)}")
        return x

    def to_float01(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC or NCHW crops -> float32 (N, 3, S, S) on [0, 1] (a view of NHWC input stays channels_last)."""
        # torchvision's ToDtype(float32, scale=True): convert, then multiply by 1/255.
        return self._nchw_uint8(x).to(torch.float32).mul_(1.0 / 255.0)

    def sample_params(self, n: int, device, generator) -> dict[str, torch.Tensor]:
        """Draw every random choice of `n` samples from `generator`, placed on `device`: one uniform
        (n, `NUM_COLUMNS`) draw, each draw of the spec's table (`augment_spec.DRAWS`) read from its columns.

        Returns:
            flip, jitter, grayscale, blur, solarize: bool (n,) masks (flip all False unless `apply_flip`);
            brightness, contrast, saturation, hue: float (n,), uniform in `jitter_ranges(spec, color_ops)`:
                `deepmind` brightness delta in [-b, b], factors in [1 - s, 1 + s]; `torchvision` factors in
                [max(0, 1 - s), 1 + s]; hue shift in turns in [-hue, hue] for both;
            order: int64 (n, 4), order[i, k] the jitter op (0 brightness, 1 contrast, 2 saturation, 3 hue) that
                sample i runs k-th, a uniform random permutation per sample;
            sigma: float (n,) blur sigma, uniform in spec.blur_sigma.
        """
        draw_device = generator.device if generator is not None else torch.device(device)
        u = torch.rand(n, NUM_COLUMNS, generator=generator, device=draw_device, dtype=torch.float32)
        # A no-op when the generator lives on `device`; a CPU generator with CUDA images costs a small copy here
        # (from pageable memory: the host waits for it), the one place a mismatched call can stall.
        u = u.to(device, non_blocking=True)
        params = {}
        for d in DRAWS:
            if d.column is None:   # drawn by the crop step
                continue
            if d.kind == "coin":
                params[d.name] = u[:, d.column] < getattr(self.spec, d.param)
            elif d.kind == "uniform":
                lo, hi = draw_range(d, self.spec, self.color_ops)
                params[d.name] = u[:, d.column].mul(hi - lo).add_(lo)
            else:   # order: a uniform random permutation per sample
                params[d.name] = torch.argsort(u[:, d.column:d.column + d.width], dim=1)
        if not self.apply_flip:
            params["flip"] = torch.zeros_like(params["flip"])
        return params

    def apply(self, x_float01_nchw: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment float [0, 1] (N, 3, S, S) images with `params` (see `sample_params`) and normalise.

        Order: the spec's (`STAGES`): flip, colour jitter (each sample's own op order), grayscale, blur, solarize,
        normalise. Deterministic given `params`. Returns float32 channels_last.
        """
        x = x_float01_nchw
        for (name,) in STAGES:
            x = self.STEPS[name](self, x, params)
        return x

    def _flip(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.apply_flip:  # a Python flag, not a tensor value: no sync
            return x
        return torch.where(_per_sample(params["flip"]), x.flip(-1), x)

    def _grayscale(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        gray = rgb_to_grayscale(x)
        return torch.where(_per_sample(params["grayscale"]), gray.expand_as(x), x)

    def _blur(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kernel_size <= 1:
            return x
        return torch.where(_per_sample(params["blur"]), gaussian_blur(x, params["sigma"], self.kernel_size), x)

    def _solarize(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return solarize(x, params["solarize"], self.spec.solarize_threshold)

    def _normalise(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        mean = self.mean.to(x.device, non_blocking=True)
        std = self.std.to(x.device, non_blocking=True)
        return (x - mean).div_(std).contiguous(memory_format=torch.channels_last)

    def _jitter(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        # Each sample runs its 4 ops in its own order. Hue (an HSV round trip, the costly op) runs once for the whole
        # batch; the three linear ops run in the spec's slots around it (`SLOTS_BEFORE_HUE`, `SLOTS_AFTER_HUE`),
        # each slot a single fused pass (`_linear_slot`) whose factors are exact identities for samples with nothing
        # to do there. Samples without jitter get identities everywhere and are kept out of the hue pass by a mask.
        # With `deepmind` maths the three ops of the slots are the reference's (`_reference_slot`), the hue the same.
        slot = self._linear_slot if self.color_ops == "torchvision" else self._reference_slot
        on = params["jitter"]
        slots = self.slot_table.to(x.device, non_blocking=True)[_order_code(params["order"])]   # (n, 6)
        none = torch.full_like(slots[:, 0], -1)
        for j in range(3):
            x = slot(x, torch.where(on, slots[:, j], none), params)
        if self.spec.hue > 0:  # a config value, not a tensor: no sync
            select = self.hsv_select.to(x.device, non_blocking=True)
            x = torch.where(_per_sample(on), adjust_hue(x, params["hue"], select), x)
        for j in range(3):
            x = slot(x, torch.where(on, slots[:, 3 + j], none), params)
        return x

    @staticmethod
    def _linear_slot(x: torch.Tensor, op: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        # Brightness, contrast or saturation per sample (op -1: none) as one blend:
        #   clamp(x * f + (1 - c) * mean(gray) + (1 - s) * gray, 0, 1), f = the selected op's factor,
        # torchvision's formulas with the two unselected terms' weights exactly 0 (x * 1 + 0 + 0 is x, bit for bit).
        one = torch.ones_like(params["brightness"])
        b = torch.where(op == BRIGHTNESS, params["brightness"], one)
        c = torch.where(op == CONTRAST, params["contrast"], one)
        s = torch.where(op == SATURATION, params["saturation"], one)
        gray = rgb_to_grayscale(x)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        y = torch.addcmul(mean * _per_sample(1.0 - c), x, _per_sample(b * c * s))
        return y.addcmul_(gray, _per_sample(1.0 - s)).clamp_(0.0, 1.0)

    @staticmethod
    def _reference_slot(x: torch.Tensor, op: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        # The reference's brightness or contrast per sample as one pass, clamp(x * c + (1 - c) * m_c + d, 0, 1) with
        # the unselected op's terms exact identities (c 1, d 0); its saturation (not linear) computed beside it and
        # selected per sample, where its factor is not 1 (factor 1 is the identity, kept bit for bit).
        one = torch.ones_like(params["contrast"])
        d = torch.where(op == BRIGHTNESS, params["brightness"], torch.zeros_like(one))
        c = _per_sample(torch.where(op == CONTRAST, params["contrast"], one))
        mean = x.mean(dim=(2, 3), keepdim=True)
        y = torch.addcmul(mean * (1.0 - c) + _per_sample(d), x, c).clamp_(0.0, 1.0)
        sat = (op == SATURATION) & (params["saturation"] != 1.0)
        return torch.where(_per_sample(sat), hsv_saturation(x, params["saturation"]), y)

    # The implementation of each of `STAGES`' ops.
    STEPS = {"flip": _flip, "jitter": _jitter, "grayscale": _grayscale, "blur": _blur, "solarize": _solarize,
             "normalise": _normalise}
