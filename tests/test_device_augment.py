"""BatchedViewAugment: parity with torchvision's functional ops, per-sample jitter order, per-sample draw statistics.

Tolerances on [0, 1] float32 pixels: atol 1e-6 for each op alone, 2e-6 for whole jitter chains (4 ops in a random
order). Measured on these photographs: brightness, saturation, grayscale, solarize and hue bit-identical to
torchvision alone; contrast <= 3.6e-7 (a fused blend and the batched mean's reduction order), blur <= 2.4e-7 (two
separable 1-D passes instead of torchvision's 2-D kernel); chains <= 8e-7. Rates of the per-sample draws are checked
within 4 sigma of a binomial over 4000 draws.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from skimage import data

from byolfast.pipeline.config import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, ViewSpec
from byolfast.pipeline.device_augment import (BRIGHTNESS, CONTRAST, HUE, SATURATION, BatchedViewAugment,
                                                       blur_kernel_size)

SIZE = 48
ATOL = 1e-6
ATOL_CHAIN = 2e-6
N_DRAWS = 4000


pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(arr: np.ndarray) -> torch.Tensor:
    img = Image.fromarray(arr).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def photos_u8() -> torch.Tensor:
    """Four real photographs, uint8 (4, 3, SIZE, SIZE)."""
    return torch.stack([_photo(a) for a in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket())])


@pytest.fixture(scope="module")
def photos(photos_u8: torch.Tensor) -> torch.Tensor:
    return photos_u8.float().mul_(1.0 / 255.0)


def _plain(spec: ViewSpec | None = None, apply_flip: bool = False) -> BatchedViewAugment:
    """An augment with torchvision's colour maths that does not normalise (mean 0, std 1), so outputs compare with
    torchvision on [0, 1]. The reference's maths (the default) are tested in `tests/test_color_ops.py`."""
    return BatchedViewAugment(spec or ViewSpec(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), SIZE, apply_flip=apply_flip,
                              color_ops="torchvision")


def _params_off(n: int) -> dict[str, torch.Tensor]:
    """Every op off; identity factors; the identity jitter order."""
    off = torch.zeros(n, dtype=torch.bool)
    one = torch.ones(n)
    return {"flip": off.clone(), "jitter": off.clone(), "brightness": one.clone(), "contrast": one.clone(),
            "saturation": one.clone(), "hue": torch.zeros(n), "order": torch.arange(4).repeat(n, 1),
            "grayscale": off.clone(), "blur": off.clone(), "sigma": one.clone(), "solarize": off.clone()}


_TV_OPS = {BRIGHTNESS: ("brightness", TF.adjust_brightness), CONTRAST: ("contrast", TF.adjust_contrast),
           SATURATION: ("saturation", TF.adjust_saturation), HUE: ("hue", TF.adjust_hue)}


def _tv_jitter(img: torch.Tensor, params: dict[str, torch.Tensor], i: int, order) -> torch.Tensor:
    for op in order:
        name, fn = _TV_OPS[int(op)]
        img = fn(img, float(params[name][i]))
    return img


def test_blur_kernel_size_is_ten_percent_and_odd():
    assert blur_kernel_size(224, 0.1) == 23
    assert blur_kernel_size(64, 0.1) == 7
    assert blur_kernel_size(32, 0.1) == 3
    assert blur_kernel_size(96, 0.1) == 9
    assert _plain().kernel_size == 5


@pytest.mark.parametrize("op, factors", [
    (BRIGHTNESS, [0.6, 0.9, 1.2, 1.4]),
    (CONTRAST, [0.6, 0.85, 1.15, 1.4]),
    (SATURATION, [0.8, 0.9, 1.1, 1.2]),
    (HUE, [-0.1, -0.03, 0.04, 0.1]),
])
def test_jitter_op_matches_torchvision(photos, op, factors):
    n = photos.shape[0]
    name, tv_op = _TV_OPS[op]
    params = _params_off(n)
    params["jitter"][:] = True
    params[name] = torch.tensor(factors)
    params["order"] = torch.tensor([op] + [o for o in range(4) if o != op]).repeat(n, 1)
    out = _plain().apply(photos, params)
    for i in range(n):
        # The other three slots run with identity factors (hue 0 is an HSV round trip, as in torchvision).
        torch.testing.assert_close(out[i], _tv_jitter(photos[i], params, i, params["order"][i]), atol=ATOL_CHAIN,
                                   rtol=0)
        torch.testing.assert_close(out[i], tv_op(photos[i], factors[i]), atol=ATOL, rtol=0)
    assert (out[0] - photos[0]).abs().max() > 0.01, "the op had no visible effect"


def test_jitter_off_is_exact_identity(photos):
    params = _params_off(4)
    params.update({"brightness": torch.full((4,), 1.3), "hue": torch.full((4,), 0.05)})
    torch.testing.assert_close(_plain().apply(photos, params), photos, atol=0, rtol=0)


def test_grayscale_matches_torchvision(photos):
    params = _params_off(4)
    params["grayscale"] = torch.tensor([True, False, True, False])
    out = _plain().apply(photos, params)
    for i in range(4):
        expected = TF.rgb_to_grayscale(photos[i], num_output_channels=3) if params["grayscale"][i] else photos[i]
        torch.testing.assert_close(out[i], expected, atol=ATOL, rtol=0)


def test_blur_matches_torchvision_per_sample_sigma(photos):
    params = _params_off(4)
    params["blur"] = torch.tensor([True, True, True, False])
    params["sigma"] = torch.tensor([0.1, 0.7, 2.0, 1.5])
    aug = _plain()
    out = aug.apply(photos, params)
    k = aug.kernel_size
    for i in range(4):
        s = float(params["sigma"][i])
        expected = TF.gaussian_blur(photos[i], [k, k], [s, s]) if params["blur"][i] else photos[i]
        torch.testing.assert_close(out[i], expected, atol=ATOL, rtol=0)
    assert (out[2] - photos[2]).abs().max() > 0.05


def test_solarize_and_flip_match_torchvision(photos):
    params = _params_off(4)
    params["solarize"] = torch.tensor([True, False, True, False])
    params["flip"] = torch.tensor([True, True, False, False])
    out = _plain(apply_flip=True).apply(photos, params)
    for i in range(4):
        img = TF.horizontal_flip(photos[i]) if params["flip"][i] else photos[i]
        expected = TF.solarize(img, 0.5) if params["solarize"][i] else img
        torch.testing.assert_close(out[i], expected, atol=ATOL, rtol=0)
    # Without apply_flip, the flip mask is ignored.
    torch.testing.assert_close(_plain().apply(photos, params)[0], TF.solarize(photos[0], 0.5), atol=0, rtol=0)


def test_normalisation_and_layout(photos):
    aug = BatchedViewAugment(ViewSpec(), IMAGENET_MEAN, IMAGENET_STD, SIZE)
    out = aug.apply(photos, _params_off(4))
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, TF.normalize(photos, list(IMAGENET_MEAN), list(IMAGENET_STD)),
                               atol=ATOL, rtol=0)


def test_jitter_order_varies_per_sample_and_is_applied_in_that_order(photos):
    n = 32
    x = photos.repeat(n // 4, 1, 1, 1)
    aug = _plain()
    params = aug.sample_params(n, "cpu", torch.Generator().manual_seed(3))
    params.update({"jitter": torch.ones(n, dtype=torch.bool), "grayscale": torch.zeros(n, dtype=torch.bool),
                   "blur": torch.zeros(n, dtype=torch.bool), "solarize": torch.zeros(n, dtype=torch.bool)})
    orders = {tuple(o.tolist()) for o in params["order"]}
    assert len(orders) >= 10, f"only {len(orders)} distinct jitter orders in {n} samples"
    assert {o.index(HUE) for o in orders} == {0, 1, 2, 3}, "hue met in every slot"
    out = aug.apply(x, params)
    differs = 0
    for i in range(n):
        expected = _tv_jitter(x[i], params, i, params["order"][i])
        torch.testing.assert_close(out[i], expected, atol=ATOL_CHAIN, rtol=0)
        reversed_order = _tv_jitter(x[i], params, i, params["order"][i].flip(0))
        differs += bool((reversed_order - expected).abs().max() > 1e-3)
    assert differs > n // 2, "the order of the ops should matter for most samples"


def _within_binomial(count: int, n: int, p: float, what: str) -> None:
    sd = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= 4 * sd + 1e-9, f"{what}: {count}/{n}, expected p={p}"


@pytest.mark.parametrize("view", ["view1", "view2"])
def test_per_sample_draw_rates(view):
    spec: ViewSpec = getattr(AugmentConfig(), view)
    aug = BatchedViewAugment(spec, IMAGENET_MEAN, IMAGENET_STD, 224, apply_flip=True, color_ops="torchvision")
    p = aug.sample_params(N_DRAWS, "cpu", torch.Generator().manual_seed(7))
    for key, prob in (("flip", spec.flip_p), ("jitter", spec.jitter_p), ("grayscale", spec.grayscale_p),
                      ("blur", spec.blur_p), ("solarize", spec.solarize_p)):
        assert p[key].shape == (N_DRAWS,) and p[key].dtype == torch.bool
        _within_binomial(int(p[key].sum()), N_DRAWS, prob, f"{view}.{key}")
    sigma = p["sigma"]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0
    assert sigma.min() < 0.11 and sigma.max() > 1.99
    assert abs(sigma.mean().item() - 1.05) < 4 * (1.9 / math.sqrt(12)) / math.sqrt(N_DRAWS)
    for key, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2),
                        ("hue", -0.1, 0.1)):
        v = p[key]
        assert v.min() >= lo and v.max() <= hi, key
        assert abs(v.mean().item() - (lo + hi) / 2) < 4 * ((hi - lo) / math.sqrt(12)) / math.sqrt(N_DRAWS), key
    order = p["order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(N_DRAWS, 4)), "each row is a permutation"
    assert len({tuple(o) for o in order.tolist()}) == 24
    for op in range(4):
        _within_binomial(int((order[:, 0] == op).sum()), N_DRAWS, 0.25, f"op {op} first")
    # Masks drawn independently per sample: grayscale and jitter co-occur at the product rate.
    _within_binomial(int((p["grayscale"] & p["jitter"]).sum()), N_DRAWS, spec.grayscale_p * spec.jitter_p, "gray&jit")


def test_flip_not_drawn_without_apply_flip():
    p = _plain().sample_params(256, "cpu", torch.Generator().manual_seed(0))
    assert not p["flip"].any()


def test_forward_accepts_nhwc_and_nchw_and_is_seeded(photos_u8, photos):
    aug = BatchedViewAugment(ViewSpec(), IMAGENET_MEAN, IMAGENET_STD, SIZE, apply_flip=True)
    x = photos_u8.repeat(4, 1, 1, 1)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x.permute(0, 2, 3, 1).contiguous(), torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == (16, 3, SIZE, SIZE) and a.dtype == torch.float32
    assert a.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert not torch.allclose(a, c)
    params = aug.sample_params(16, "cpu", torch.Generator().manual_seed(1))
    # On the CPU `forward` runs the per-pixel kernels; normalising divides their ~1e-6 differences by std (~0.22).
    torch.testing.assert_close(a, aug.apply(aug.to_float01(x), params), atol=ATOL_CHAIN / min(IMAGENET_STD), rtol=0)
    assert torch.isfinite(a).all()
    with pytest.raises(TypeError):
        aug(x.float())
    with pytest.raises(ValueError):
        aug(x[:, :, :SIZE - 1])


@pytest.mark.parametrize("view", ["view1", "view2"])
def test_cpu_kernels_match_the_batched_ops(photos_u8, view):
    """The CPU path (`apply_cpu`: per-sample numba kernels, blur only where drawn) against the batched torch ops that
    the tests above hold to torchvision, on the same draws: every op, order and mask of 64 samples of each view."""
    spec = getattr(AugmentConfig(), view)
    aug = _plain(spec, apply_flip=True)
    x = photos_u8.repeat(16, 1, 1, 1)
    params = aug.sample_params(x.shape[0], "cpu", torch.Generator().manual_seed(3))
    assert params["jitter"].any() and params["grayscale"].any() and params["flip"].any()
    assert params["blur"].any() and (view == "view1" or params["solarize"].any())
    ref = aug.apply(aug.to_float01(x), params)
    out = aug.apply_cpu(x, params)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=ATOL_CHAIN, rtol=0)
    torch.set_num_threads(2)   # samples split over two threads: the same result
    try:
        torch.testing.assert_close(aug.apply_cpu(x.permute(0, 2, 3, 1).contiguous(), params), out, atol=0, rtol=0)
    finally:
        torch.set_num_threads(1)


def test_cpu_kernels_reuse_their_float_buffer_only_behind_a_cast(photos_u8):
    """On the CPU in bf16 the kernels write into a float32 buffer kept from batch to batch (only the cast is handed
    out): each batch equals the float32 path's cast, and an earlier batch is not overwritten by a later one; in
    float32 the result itself is handed out, a new tensor each batch."""
    aug = _plain(AugmentConfig().view1, apply_flip=True)
    x1, x2 = photos_u8.repeat(4, 1, 1, 1), photos_u8.flip(0).repeat(4, 1, 1, 1)
    outs = [aug(x, torch.Generator().manual_seed(s), dtype=torch.bfloat16) for s, x in ((1, x1), (2, x2))]
    refs = [aug(x, torch.Generator().manual_seed(s)).to(torch.bfloat16) for s, x in ((1, x1), (2, x2))]
    for out, ref in zip(outs, refs):
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert aug._cpu_scratch is not None and outs[0].data_ptr() != outs[1].data_ptr()
    a, b = (aug(x1, torch.Generator().manual_seed(1)) for _ in range(2))
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)


def test_cpu_kernels_keep_hue_off_when_its_strength_is_zero(photos_u8):
    """spec.hue 0: no HSV round trip at all (as the batched path), so jitter with identity factors is exact."""
    aug = _plain(ViewSpec(hue=0.0))
    params = _params_off(4)
    params["jitter"][:] = True
    torch.testing.assert_close(aug.apply_cpu(photos_u8, params), aug.to_float01(photos_u8), atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forward_on_cuda_has_no_host_sync_and_matches_cpu(photos_u8):
    aug = BatchedViewAugment(AugmentConfig().view2, IMAGENET_MEAN, IMAGENET_STD, SIZE, apply_flip=True).cuda()
    x = photos_u8.repeat(16, 1, 1, 1).cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    aug(x, gen)  # warm-up: lazy initialisation may sync
    gen.manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = aug(x, gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    gen.manual_seed(0)
    params = {k: v.cpu() for k, v in aug.sample_params(x.shape[0], "cuda", gen).items()}
    ref = aug.cpu().apply(aug.to_float01(x.cpu()), params)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=0)


def test_blur_computes_only_on_the_drawn_samples(photos, monkeypatch):
    """Host masks: the blur (and every op of p < 1) runs on the drawn subset only; the drawn samples get the values
    of the whole-batch blend bit for bit, the others are untouched."""
    from byolfast.pipeline import device_augment

    spec = AugmentConfig().view2   # blur p 0.1, solarize p 0.2
    aug = BatchedViewAugment(spec, IMAGENET_MEAN, IMAGENET_STD, SIZE, apply_flip=True, color_ops="torchvision")
    x = photos.repeat(16, 1, 1, 1)
    params = aug.sample_params(x.shape[0], "cpu", torch.Generator().manual_seed(5))
    drawn = int(params["blur"].sum())
    assert 0 < drawn < x.shape[0]
    blurred = []
    real_blur = device_augment.gaussian_blur
    monkeypatch.setattr(device_augment, "gaussian_blur", lambda y, *a: blurred.append(y.shape[0]) or real_blur(y, *a))
    out = aug.apply(x, params)
    assert blurred == [drawn], "the blur computes on the drawn samples only"
    # The whole-batch path (masks as if on a device: host=None) gives the same values.
    blurred.clear()
    whole = aug._augment(x.clone(), params, None, torch.float32)
    assert blurred == [x.shape[0]]
    torch.testing.assert_close(out, whole, atol=0, rtol=0)
    # Nothing drawn: an untouched batch (normalised only).
    off = _params_off(x.shape[0])
    torch.testing.assert_close(aug.apply(x, off), (x - aug.mean) / aug.std, atol=0, rtol=0)


def test_apply_leaves_its_input_alone(photos):
    aug = BatchedViewAugment(AugmentConfig().view2, IMAGENET_MEAN, IMAGENET_STD, SIZE, apply_flip=True)
    x = photos.repeat(8, 1, 1, 1)
    before = x.clone()
    aug.apply(x, aug.sample_params(x.shape[0], "cpu", torch.Generator().manual_seed(1)))
    assert torch.equal(x, before)


@pytest.mark.parametrize("color_ops", ["deepmind", "torchvision"])
def test_channels_last_in_channels_last_out_without_layout_copies(photos_u8, color_ops, monkeypatch):
    """A channels_last batch stays channels_last through every op: no `.contiguous()` anywhere, the same values as
    an NCHW-contiguous batch."""
    spec = ViewSpec(blur_p=0.5, solarize_p=0.5, grayscale_p=0.5)
    aug = BatchedViewAugment(spec, IMAGENET_MEAN, IMAGENET_STD, SIZE, apply_flip=True, cpu_kernels=False,
                             color_ops=color_ops)
    nhwc = photos_u8.repeat(8, 1, 1, 1).permute(0, 2, 3, 1).contiguous()
    params = aug.sample_params(nhwc.shape[0], "cpu", torch.Generator().manual_seed(2))
    x = aug.to_float01(nhwc)
    assert x.is_contiguous(memory_format=torch.channels_last)
    ref = aug.apply(x.contiguous(), params)
    calls = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda t, *a, **k: calls.append(1) or real(t, *a, **k))
    out = aug.apply(x, params)
    monkeypatch.undo()
    assert not calls, "no layout round trip"
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_output_in_the_training_dtype(photos_u8, dtype):
    """`forward(dtype=...)` writes the training dtype directly: the float32 result rounded once, channels_last."""
    aug = BatchedViewAugment(AugmentConfig().view1, IMAGENET_MEAN, IMAGENET_STD, SIZE, apply_flip=True,
                             cpu_kernels=False)
    x = photos_u8.repeat(4, 1, 1, 1)
    ref = aug(x, torch.Generator().manual_seed(4))
    out = aug(x, torch.Generator().manual_seed(4), dtype=dtype)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref.to(dtype)), "one rounding of the float32 result"
    cpu = BatchedViewAugment(AugmentConfig().view1, IMAGENET_MEAN, IMAGENET_STD, SIZE, apply_flip=True)
    assert cpu(x, torch.Generator().manual_seed(4), dtype=dtype).dtype == dtype   # the per-pixel kernels' path
