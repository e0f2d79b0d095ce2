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

Ops only where drawn: flip, jitter, grayscale, blur and solarize compute on the samples whose coin says so (indexed,
computed, written back) when the masks are on the host (a CPU generator); the others are not touched. Masks drawn on
a CUDA device would need a host sync to size the subset, so there each op runs on the whole batch and `torch.where`
keeps the drawn samples' results: the same values either way. Memory format: every op keeps it, so channels_last
crops stay channels_last with no layout copy. Output dtype: `forward`'s `dtype`, rounded once by the normalisation.

Host-device syncs: none in `forward`/`sample_params`/`apply`; no Python branch on a device tensor's value. Give
`forward` a generator on the same device as the images, and move the module there, or each call copies the draws /
constants across (a CPU generator then buys the subsets above at the price of those copies).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from byolfast.pipeline.augment_spec import (BRIGHTNESS, CONTRAST, DRAWS, HUE, NUM_COLUMNS, OPS, SATURATION,
                                            blur_kernel_size, draw_range, jitter_ranges)
from byolfast.pipeline.config import ViewSpec
from byolfast.pipeline.device_ops import (_HSV_SELECT, JITTER_FUNCTIONS, _order_code, _per_sample, _slot_table,
                                          add_brightness, adjust_brightness, adjust_contrast, adjust_hue,
                                          adjust_saturation, channel_contrast, gaussian_blur, gaussian_kernels,
                                          hsv_saturation, rgb_to_grayscale, solarize)

__all__ = ["BRIGHTNESS", "CONTRAST", "SATURATION", "HUE", "JITTER_FUNCTIONS", "STAGES", "BatchedViewAugment",
           "add_brightness", "adjust_brightness", "adjust_contrast", "adjust_hue", "adjust_saturation",
           "blur_kernel_size", "channel_contrast", "gaussian_blur", "gaussian_kernels", "hsv_saturation",
           "jitter_ranges", "rgb_to_grayscale", "solarize"]   # with the spec's names that callers import from here

# The spec's ops this engine runs, one pass each, in the spec's order (the crop is done upstream).
STAGES = tuple((name,) for name in OPS if name != "crop")



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
        self._cpu_scratch: Optional[torch.Tensor] = None   # the CPU kernels' float32 output when only a cast leaves

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, kernel_size={self.kernel_size}, apply_flip={self.apply_flip}, "
                f"color_ops={self.color_ops}")

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x: uint8 images already cropped to image_size, (N,H,W,3) NHWC or (N,3,H,W), on any device.

        Returns normalised (N,3,H,W) in `dtype` (the training dtype: the arithmetic stays float32, only the last
        write rounds to it) and channels_last memory format, on x's device. On the CPU (with `cpu_kernels`) the
        per-pixel kernels of `pipeline.cpu_augment` run instead of the batched passes: the same draws, the same
        result within float rounding, several times faster there.
        """
        params, host = self._draw(x.shape[0], x.device, generator)
        if x.device.type == "cpu" and self.cpu_kernels:
            if dtype == torch.float32:   # handed out as it is: a fresh tensor
                return self.apply_cpu(x, params)
            # only the cast is handed out: the float32 result goes to a buffer kept from the last batch (a fresh one
            # costs a page fault per 4 kB, ~0.2 ms a 224 px view)
            shape = (x.shape[0], self.image_size, self.image_size, 3)
            if self._cpu_scratch is None or tuple(self._cpu_scratch.shape) != shape:
                self._cpu_scratch = torch.empty(shape, dtype=torch.float32)
            return self.apply_cpu(x, params, out=self._cpu_scratch).to(dtype)
        return self._augment(self.to_float01(x), params, host, dtype)

    def apply_cpu(self, x: torch.Tensor, params: dict[str, torch.Tensor],
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`apply` for uint8 crops on the CPU: each sample runs only its own ops (`pipeline.cpu_augment`'s stages),
        the blur only on the samples that draw it. x: uint8 (N, S, S, 3) or (N, 3, S, S); `out`: a float32
        (N, S, S, 3) buffer to write into (else a new one). Returns float32 channels_last (a view of `out`)."""
        from byolfast.pipeline import cpu_augment

        return cpu_augment.augment_crops(self._nchw_uint8(x), params, self.spec, self.color_ops, self.apply_flip,
                                         self.kernel_size, self.mean.flatten().numpy(), self.std.flatten().numpy(),
                                         out=out)

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

    def _draw(self, n: int, device, generator) -> tuple[dict[str, torch.Tensor], Optional[dict[str, torch.Tensor]]]:
        # `sample_params`, and its masks on the host when they were drawn there (a CPU generator): a host mask sizes
        # the drawn subsets without a sync. Masks drawn on a CUDA device stay there (None): see `_on_drawn`.
        drawn = self._sample(n, device, generator)
        params = _moved(drawn, device)
        return params, (drawn if drawn["blur"].device.type == "cpu" else None)

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
        return _moved(self._sample(n, device, generator), device)

    def _sample(self, n: int, device, generator) -> dict[str, torch.Tensor]:
        # `sample_params` on the generator's device (`device` without a generator).
        draw_device = generator.device if generator is not None else torch.device(device)
        u = torch.rand(n, NUM_COLUMNS, generator=generator, device=draw_device, dtype=torch.float32)
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

    def apply(self, x_float01_nchw: torch.Tensor, params: dict[str, torch.Tensor],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Augment float [0, 1] (N, 3, S, S) images with `params` (see `sample_params`) and normalise; x is left as
        it is.

        Order: the spec's (`STAGES`): flip, colour jitter (each sample's own op order), grayscale, blur, solarize,
        normalise. Deterministic given `params`. Returns `dtype`, channels_last. With masks on the host (CPU params)
        each per-sample op computes only on the samples that drew it; with masks on a CUDA device, on every sample,
        blended by the mask (the same values: see `_on_drawn`).
        """
        host = params if params["blur"].device.type == "cpu" else None
        return self._augment(x_float01_nchw.clone(), params, host, dtype)

    def _augment(self, x: torch.Tensor, params: dict[str, torch.Tensor], host: Optional[dict[str, torch.Tensor]],
                 dtype: torch.dtype) -> torch.Tensor:
        # x is owned here: the stages write the drawn subsets back into it in place.
        for (name,) in STAGES:
            x = self._normalise(x, dtype) if name == "normalise" else self.STEPS[name](self, x, params, host)
        return x

    def _on_drawn(self, x: torch.Tensor, mask: str, params: dict[str, torch.Tensor],
                  host: Optional[dict[str, torch.Tensor]],
                  op: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
        """`op(x_sub, params_sub)` on the samples where `params[mask]` is set, written back into x (in place); the
        others untouched. The op is per sample (no value depends on another sample), so the drawn samples get
        exactly the values a whole-batch pass would give them.

        With the mask on the host the subset is indexed and only it is computed. With the mask on a CUDA device
        (drawn by a CUDA generator), the subset's size is a device value: reading it would be a host sync in the hot
        loop, so there the op runs on the whole batch and `torch.where` keeps the drawn samples' results.
        """
        if host is None:   # the CUDA branch (masks drawn on the device): no sync, the whole batch
            return torch.where(_per_sample(params[mask]), op(x, params), x)
        idx = host[mask].nonzero().flatten()   # host values: no device sync
        if len(idx) == 0:
            return x
        if len(idx) == x.shape[0]:
            return op(x, params)
        idx = idx.to(x.device, non_blocking=True)
        sub = {k: v.index_select(0, idx.to(v.device, non_blocking=True)) for k, v in params.items()}
        return x.index_copy_(0, idx, op(x.index_select(0, idx), sub))

    def _flip(self, x: torch.Tensor, params: dict[str, torch.Tensor], host) -> torch.Tensor:
        if not self.apply_flip:  # a Python flag, not a tensor value: no sync
            return x
        return self._on_drawn(x, "flip", params, host, lambda y, p: y.flip(-1))

    def _grayscale(self, x: torch.Tensor, params: dict[str, torch.Tensor], host) -> torch.Tensor:
        return self._on_drawn(x, "grayscale", params, host, lambda y, p: rgb_to_grayscale(y).expand_as(y))

    def _blur(self, x: torch.Tensor, params: dict[str, torch.Tensor], host) -> torch.Tensor:
        if self.kernel_size <= 1:
            return x
        return self._on_drawn(x, "blur", params, host, lambda y, p: gaussian_blur(y, p["sigma"], self.kernel_size))

    def _solarize(self, x: torch.Tensor, params: dict[str, torch.Tensor], host) -> torch.Tensor:
        threshold = self.spec.solarize_threshold
        return self._on_drawn(x, "solarize", params, host, lambda y, p: torch.where(y >= threshold, 1.0 - y, y))

    def _normalise(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # (x - mean) / std in float32, rounded once to `dtype` by writing the division into a channels_last output:
        # no float32 result to cast afterwards, and no layout copy when x is channels_last already.
        mean = self.mean.to(x.device, non_blocking=True)
        std = self.std.to(x.device, non_blocking=True)
        out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=torch.channels_last)
        return torch.div(x - mean, std, out=out)

    def _jitter(self, x: torch.Tensor, params: dict[str, torch.Tensor], host) -> torch.Tensor:
        return self._on_drawn(x, "jitter", params, host, self._jitter_all)

    def _jitter_all(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        # Jitter on every sample of x (`_on_drawn` hands it the drawn ones): each runs its 4 ops in its own order.
        # Hue (an HSV round trip, the costly op) runs once for the whole batch; the three linear ops run in the
        # spec's slots around it (`SLOTS_BEFORE_HUE`, `SLOTS_AFTER_HUE`), each slot a single fused pass
        # (`_linear_slot`) whose factors are exact identities for samples with nothing to do there. With `deepmind`
        # maths the three ops of the slots are the reference's (`_reference_slot`), the hue the same.
        slot = self._linear_slot if self.color_ops == "torchvision" else self._reference_slot
        slots = self.slot_table.to(x.device, non_blocking=True)[_order_code(params["order"])]   # (n, 6)
        for j in range(3):
            x = slot(x, slots[:, j], params)
        if self.spec.hue > 0:  # a config value, not a tensor: no sync
            x = adjust_hue(x, params["hue"], self.hsv_select.to(x.device, non_blocking=True))
        for j in range(3):
            x = slot(x, slots[:, 3 + j], params)
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

    # The implementation of each of `STAGES`' ops (normalise, which also sets the dtype, is `_normalise`).
    STEPS = {"flip": _flip, "jitter": _jitter, "grayscale": _grayscale, "blur": _blur, "solarize": _solarize}


def _moved(params: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    # No-ops when the draws were made on `device`. A CPU generator with CUDA images costs small copies from pageable
    # memory (the host waits for each): the one place a mismatched call can stall.
    return {k: v.to(device, non_blocking=True) for k, v in params.items()}
