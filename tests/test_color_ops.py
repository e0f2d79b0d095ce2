"""The reference's colour-jitter maths (`data.augment.color_ops=deepmind`, the default) on every engine, against a
float64 numpy transcription of DeepMind's BYOL reference (deepmind-research, `byol/utils/augmentations.py`), and the
ranges of its draws.

Engines: the batched torch ops (`pipeline.device_augment`, which the FFCV backend runs), their CPU numba kernels
(`pipeline.cpu_augment`), the torch backend's `ReferenceColorJitter`, and DALI's graph ops and its CPU kernel
operator. Tolerances, float32 engines on [0, 1] pixels: atol 1e-6 for one op, 2e-6 for jitter chains and for the CPU
kernels against the batched ops (measured on these photographs: <= 4.6e-7 for one op followed by the hue's HSV round
trip, <= 5e-7 for chains, 7.6e-7 kernels against batched ops). DALI on uint8 pixels, in grey levels: each graph op
within 0.5 + 1e-3 (one rounding; measured 0.5), the one-pass CPU kernel's whole chain within 0.5 + 1e-3 (measured
0.49997), the graph's chain (rounded after each op, DALI's luma for grayscale) mean < 0.6 and 99th percentile <= 3
(measured 0.53 and 1.8), as `tests/test_dali_loader.py` holds torchvision's. Draw ranges: every draw inside its range,
the mean within 4 sigma of the range's centre, the extremes within 1 % (DALI, 1000 draws: 2 %) of the range's ends.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from byolfast.pipeline.config import COLOR_OPS, AugmentConfig, DataConfig, ViewSpec
from byolfast.pipeline.device_augment import BRIGHTNESS, CONTRAST, HUE, SATURATION, BatchedViewAugment, jitter_ranges

SIZE = 40
ATOL = 1e-6
ATOL_CHAIN = 2e-6
N_DRAWS = 4000
NAMES = {BRIGHTNESS: "brightness", CONTRAST: "contrast", SATURATION: "saturation", HUE: "hue"}
IDENTITY = {BRIGHTNESS: 0.0, CONTRAST: 1.0, SATURATION: 1.0, HUE: 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


# --- the reference's maths in float64 numpy, on (H, W, 3) images on [0, 1] --------------------------------------------

def _rgb_to_hsv(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # TF's rgb_to_hsv as the reference writes it: hue in turns, branch on the channel holding the maximum (r, g, b).
    r, g, b = np.moveaxis(img, -1, 0)
    v = np.maximum(np.maximum(r, g), b)
    chroma = v - np.minimum(np.minimum(r, g), b)
    s = np.where(v > 0, chroma / np.where(v > 0, v, 1.0), 0.0)
    norm = np.where(chroma != 0, 1.0 / (6.0 * np.where(chroma != 0, chroma, 1.0)), 1e9)
    h = np.where(r == v, norm * (g - b), np.where(g == v, norm * (b - r) + 2.0 / 6.0, norm * (r - g) + 4.0 / 6.0))
    h = h * (chroma > 0)
    return h + (h < 0), s, v


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    c = s * v
    m = v - c
    dh = (h % 1.0) * 6.0
    x = c * (1.0 - np.abs(dh % 2.0 - 1.0))
    k = np.floor(dh).astype(np.int64)
    r = np.where((k == 0) | (k == 5), c, np.where((k == 1) | (k == 4), x, 0.0)) + m
    g = np.where((k == 1) | (k == 2), c, np.where((k == 0) | (k == 3), x, 0.0)) + m
    b = np.where((k == 3) | (k == 4), c, np.where((k == 2) | (k == 5), x, 0.0)) + m
    return np.stack((r, g, b), axis=-1)


def ref_op(img: np.ndarray, op: int, value: float) -> np.ndarray:
    """One op of the reference's colour jitter, followed by its clip to [0, 1]."""
    if op == BRIGHTNESS:
        out = img + value
    elif op == CONTRAST:
        mean = img.mean(axis=(0, 1), keepdims=True)
        out = value * (img - mean) + mean
    elif op == SATURATION:
        h, s, v = _rgb_to_hsv(img)
        out = _hsv_to_rgb(h, np.clip(s * value, 0.0, 1.0), v)
    else:
        h, s, v = _rgb_to_hsv(img)
        out = _hsv_to_rgb((h + value) % 1.0, s, v)
    return np.clip(out, 0.0, 1.0)


def ref_jitter(img: np.ndarray, order, values: dict[int, float], spec: ViewSpec) -> np.ndarray:
    """The ops in `order`, each of non-zero strength, as the reference runs them."""
    strengths = {BRIGHTNESS: spec.brightness, CONTRAST: spec.contrast, SATURATION: spec.saturation, HUE: spec.hue}
    for op in order:
        if strengths[int(op)] > 0:
            img = ref_op(img, int(op), values[int(op)])
    return img


def ref_grayscale(img: np.ndarray) -> np.ndarray:
    gray = img @ np.array([0.2989, 0.5870, 0.1140])
    return np.clip(np.repeat(gray[..., None], 3, axis=-1), 0.0, 1.0)


# --- fixtures ---------------------------------------------------------------------------------------------------------

def _photo(arr: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)).copy()


@pytest.fixture(scope="module")
def photos_u8() -> torch.Tensor:
    """Four photographs, uint8 (4, 3, SIZE, SIZE); the rocket's sky and the coffee's saucer hold grey pixels."""
    return torch.stack([torch.from_numpy(_photo(a)).permute(2, 0, 1)
                        for a in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket())])


def _hwc64(x: torch.Tensor) -> np.ndarray:
    """float (3, H, W) -> float64 (H, W, 3)."""
    return x.permute(1, 2, 0).double().numpy()


def _plain(spec: ViewSpec, color_ops: str = "deepmind", apply_flip: bool = False) -> BatchedViewAugment:
    return BatchedViewAugment(spec, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), SIZE, apply_flip=apply_flip,
                              color_ops=color_ops)


def _jitter_only(n: int, op: int, values: list[float]) -> dict[str, torch.Tensor]:
    """Jitter on for every sample, `op` first with `values`, the other three after it with identity values."""
    off = torch.zeros(n, dtype=torch.bool)
    params = {"flip": off.clone(), "jitter": ~off, "grayscale": off.clone(), "blur": off.clone(),
              "solarize": off.clone(), "sigma": torch.ones(n),
              "order": torch.tensor([op] + [o for o in range(4) if o != op]).repeat(n, 1)}
    params.update({NAMES[o]: torch.full((n,), IDENTITY[o]) for o in range(4)})
    params[NAMES[op]] = torch.tensor(values, dtype=torch.float32)
    return params


def _values(params: dict[str, torch.Tensor], i: int) -> dict[int, float]:
    return {o: float(params[NAMES[o]][i]) for o in range(4)}


OP_VALUES = [
    (BRIGHTNESS, [-0.4, -0.1, 0.15, 0.4]),
    (CONTRAST, [0.6, 0.85, 1.2, 1.4]),
    (SATURATION, [0.8, 0.9, 1.1, 1.2]),
    (HUE, [-0.1, -0.03, 0.04, 0.1]),
]


# --- the batched torch ops and their CPU kernels ----------------------------------------------------------------------

@pytest.mark.parametrize("op, values", OP_VALUES)
def test_device_op_matches_the_reference(photos_u8, op, values):
    aug = _plain(ViewSpec())
    x = aug.to_float01(photos_u8)
    params = _jitter_only(4, op, values)
    out = aug.apply(x, params)
    kernels = aug.apply_cpu(photos_u8, params)
    for i in range(4):
        img = _hwc64(x[i])
        expected = ref_jitter(img, params["order"][i].tolist(), _values(params, i), aug.spec)
        np.testing.assert_allclose(_hwc64(out[i]), expected, atol=ATOL_CHAIN, rtol=0)
        np.testing.assert_allclose(_hwc64(out[i]), ref_op(img, op, values[i]), atol=ATOL, rtol=0)
        np.testing.assert_allclose(_hwc64(kernels[i]), expected, atol=ATOL_CHAIN, rtol=0)
    assert np.abs(_hwc64(out[0]) - _hwc64(x[0])).max() > 0.01, "the op had no visible effect"


def test_saturation_clips_at_full_saturation_and_keeps_grey(photos_u8):
    """A factor that pushes S past 1 clips it (the smallest channel goes to 0); grey pixels do not move."""
    aug = _plain(ViewSpec(saturation=3.0))
    x = aug.to_float01(photos_u8)
    params = _jitter_only(4, SATURATION, [3.0, 3.0, 0.0, 2.5])
    out = aug.apply(x, params)
    for i in range(4):
        np.testing.assert_allclose(_hwc64(out[i]), ref_op(_hwc64(x[i]), SATURATION, float(params["saturation"][i])),
                                   atol=ATOL, rtol=0)
    grey = (x.amax(1) == x.amin(1))
    assert grey.any(), "the photographs hold grey pixels"
    assert torch.equal(out.permute(0, 2, 3, 1)[grey], x.permute(0, 2, 3, 1)[grey])
    sat = (x[0].amax(0) - x[0].amin(0)) / x[0].amax(0).clamp(min=1e-6)
    clipped = sat * 3.0 > 1.001
    assert clipped.float().mean() > 0.2
    assert (out[0].amin(0)[clipped] < 1e-6).all(), "S * 3 > 1: S clips to 1, the smallest channel goes to 0"
    np.testing.assert_allclose(out[2].std(0).max().item(), 0.0, atol=1e-6)   # factor 0: grey everywhere


@pytest.mark.parametrize("view", ["view1", "view2"])
def test_device_chains_and_grayscale_match_the_reference(photos_u8, view):
    """64 samples with their drawn orders and values, jitter and grayscale as drawn; blur and solarize off."""
    spec = getattr(AugmentConfig(), view)
    aug = _plain(spec)
    x_u8 = photos_u8.repeat(16, 1, 1, 1)
    params = aug.sample_params(64, "cpu", torch.Generator().manual_seed(11))
    params.update(blur=torch.zeros(64, dtype=torch.bool), solarize=torch.zeros(64, dtype=torch.bool))
    assert params["jitter"].any() and params["grayscale"].any() and not params["jitter"].all()
    x = aug.to_float01(x_u8)
    out = aug.apply(x, params)
    kernels = aug.apply_cpu(x_u8, params)
    for i in range(64):
        expected = _hwc64(x[i])
        if params["jitter"][i]:
            expected = ref_jitter(expected, params["order"][i].tolist(), _values(params, i), spec)
        if params["grayscale"][i]:
            expected = ref_grayscale(expected)
        np.testing.assert_allclose(_hwc64(out[i]), expected, atol=ATOL_CHAIN, rtol=0)
        np.testing.assert_allclose(_hwc64(kernels[i]), expected, atol=ATOL_CHAIN, rtol=0)


@pytest.mark.parametrize("view", ["view1", "view2"])
def test_cpu_kernels_match_the_batched_ops_with_every_op(photos_u8, view):
    """The whole view (flip, jitter, grayscale, blur, solarize) on the CPU kernels and the batched ops, same draws."""
    aug = _plain(getattr(AugmentConfig(), view), apply_flip=True)
    x = photos_u8.repeat(16, 1, 1, 1)
    params = aug.sample_params(64, "cpu", torch.Generator().manual_seed(3))
    torch.testing.assert_close(aug.apply_cpu(x, params), aug.apply(aug.to_float01(x), params), atol=ATOL_CHAIN,
                               rtol=0)


def test_jitter_off_and_identity_values_are_exact(photos_u8):
    aug = _plain(ViewSpec(hue=0.0))
    x = aug.to_float01(photos_u8)
    for op in (BRIGHTNESS, CONTRAST, SATURATION):
        params = _jitter_only(4, op, [IDENTITY[op]] * 4)
        torch.testing.assert_close(aug.apply(x, params), x, atol=0, rtol=0)
        torch.testing.assert_close(aug.apply_cpu(photos_u8, params), x, atol=0, rtol=0)


def _check_uniform(v: torch.Tensor, lo: float, hi: float, what: str) -> None:
    n = v.numel()
    assert v.min() >= lo and v.max() <= hi, f"{what}: [{v.min()}, {v.max()}] outside [{lo}, {hi}]"
    assert v.min() < lo + 0.01 * (hi - lo) and v.max() > hi - 0.01 * (hi - lo), f"{what}: does not reach the ends"
    assert abs(v.mean().item() - (lo + hi) / 2) < 4 * ((hi - lo) / math.sqrt(12)) / math.sqrt(n), what


@pytest.mark.parametrize("view", ["view1", "view2"])
def test_device_draw_ranges(view):
    spec = getattr(AugmentConfig(), view)
    p = _plain(spec).sample_params(N_DRAWS, "cpu", torch.Generator().manual_seed(7))
    for name, lo, hi in (("brightness", -0.4, 0.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2),
                         ("hue", -0.1, 0.1)):
        _check_uniform(p[name], lo, hi, f"{view}.{name}")
    # The same table of draws as torchvision's maths: the brightness delta is its factor minus 1, the rest equal.
    tv = _plain(spec, "torchvision").sample_params(N_DRAWS, "cpu", torch.Generator().manual_seed(7))
    torch.testing.assert_close(p["brightness"], tv["brightness"] - 1.0, atol=1e-6, rtol=0)
    for k in p:
        if k != "brightness":
            assert torch.equal(p[k], tv[k]), k


def test_ranges_of_both_maths():
    spec = ViewSpec(brightness=1.5, contrast=0.4, saturation=1.2, hue=0.1)
    assert jitter_ranges(spec, "deepmind") == {"brightness": (-1.5, 1.5), "contrast": (0.6, 1.4),
                                               "saturation": (1.0 - 1.2, 2.2), "hue": (-0.1, 0.1)}
    assert jitter_ranges(spec, "torchvision") == {"brightness": (0.0, 2.5), "contrast": (0.6, 1.4),
                                                  "saturation": (0.0, 2.2), "hue": (-0.1, 0.1)}
    with pytest.raises(ValueError, match="data.augment.color_ops='tf'.*deepmind, torchvision"):
        BatchedViewAugment(spec, (0.0,) * 3, (1.0,) * 3, SIZE, color_ops="tf")


# --- the config -------------------------------------------------------------------------------------------------------

def test_config_default_is_the_reference_and_checked():
    from byolfast.train.config import ConfigError, load_config

    assert COLOR_OPS == ("deepmind", "torchvision")
    assert AugmentConfig().color_ops == "deepmind" and load_config().data.augment.color_ops == "deepmind"
    assert load_config(None, ["data.augment.color_ops=torchvision"]).data.augment.color_ops == "torchvision"
    with pytest.raises(ConfigError, match=r"data.augment.color_ops='hsv' is out of range: one of deepmind, "
                                          r"torchvision"):
        load_config(None, ["data.augment.color_ops=hsv"])


# --- the torch backend ------------------------------------------------------------------------------------------------

def test_torch_backend_op_matches_the_reference(photos_u8):
    from byolfast.pipeline.backends.torch.loader import ReferenceColorJitter

    spec = ViewSpec()
    x = photos_u8.float().mul_(1.0 / 255.0)
    for op, values in OP_VALUES:
        for i, v in enumerate(values):
            out = ReferenceColorJitter.apply(x[i], [op], {op: torch.tensor([v])})
            np.testing.assert_allclose(_hwc64(out), ref_op(_hwc64(x[i]), op, v), atol=ATOL, rtol=0)
    jitter = ReferenceColorJitter(spec)
    for seed in range(12):
        torch.manual_seed(seed)
        order, values = jitter.make_params()
        torch.manual_seed(seed)
        out = jitter(x[seed % 4])
        expected = ref_jitter(_hwc64(x[seed % 4]), order, {op: float(v) for op, v in values.items()}, spec)
        np.testing.assert_allclose(_hwc64(out), expected, atol=ATOL_CHAIN, rtol=0)


def test_torch_backend_draws_what_colorjitter_draws_in_the_reference_ranges():
    from torchvision.transforms import v2

    from byolfast.pipeline.backends.torch.loader import ReferenceColorJitter

    spec = ViewSpec()
    ours, theirs = ReferenceColorJitter(spec), v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    for seed in range(20):   # one seed, the same numbers: the order, and the uniforms mapped to the two ranges
        torch.manual_seed(seed)
        order, values = ours.make_params()
        torch.manual_seed(seed)
        tv = theirs.make_params([])
        assert order == tv["fn_idx"].tolist()
        assert abs(float(values[BRIGHTNESS]) - (tv["brightness_factor"] - 1.0)) < 1e-6
        assert float(values[CONTRAST]) == tv["contrast_factor"] and float(values[HUE]) == tv["hue_factor"]
        assert float(values[SATURATION]) == tv["saturation_factor"]
    torch.manual_seed(0)
    draws = [ours.make_params() for _ in range(N_DRAWS)]
    for op, (lo, hi) in ((BRIGHTNESS, (-0.4, 0.4)), (CONTRAST, (0.6, 1.4)), (SATURATION, (0.8, 1.2)),
                         (HUE, (-0.1, 0.1))):
        _check_uniform(torch.cat([v[op] for _, v in draws]), lo, hi, NAMES[op])
    firsts = np.bincount([o[0] for o, _ in draws], minlength=4)
    assert (np.abs(firsts - N_DRAWS / 4) < 4 * math.sqrt(N_DRAWS * 0.25 * 0.75)).all(), firsts
    assert 0 not in ReferenceColorJitter(ViewSpec(brightness=0.0)).make_params()[1], "strength 0: not drawn"


@pytest.mark.parametrize("color_ops", COLOR_OPS)
def test_torch_loader_builds_the_chosen_jitter(tmp_path, photos_u8, color_ops):
    from torchvision.transforms import v2

    from byolfast.pipeline.contract import LoaderContext
    from byolfast.pipeline.backends.torch.loader import ReferenceColorJitter, TorchTwoViewLoader

    for n in range(4):
        (tmp_path / "c").mkdir(exist_ok=True)
        Image.fromarray(photos_u8[n].permute(1, 2, 0).numpy()).save(tmp_path / "c" / f"{n}.jpg")
    cfg = DataConfig(backend="torch", path=str(tmp_path), image_size=16, num_workers=0,
                     augment=AugmentConfig(color_ops=color_ops))
    loader = TorchTwoViewLoader(cfg, LoaderContext(batch_size=4))
    expected = ReferenceColorJitter if color_ops == "deepmind" else v2.ColorJitter
    for view in loader.dataset.transforms:
        jitter = [t for t in view.transforms if isinstance(t, v2.RandomApply)][0].transforms[0]
        assert type(jitter) is expected
    batch = next(iter(loader))
    assert torch.isfinite(batch.view1).all() and batch.view1.shape == (4, 3, 16, 16)
    loader.close()


# --- DALI -------------------------------------------------------------------------------------------------------------

def _dali_run(images: list[np.ndarray], graph, batch_size: int | None = None, seed: int = 0,
              conditionals: bool = False) -> list:
    """Run `graph(images_node)` over uint8 HWC `images` in one CPU DALI pipeline; outputs as lists of arrays."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(enable_conditionals=conditionals)
    def pipe():
        return graph(fn.external_source(source=lambda: images, batch=True, layout="HWC"))

    p = pipe(batch_size=batch_size or len(images), num_threads=2, device_id=None, seed=seed)
    p.build()
    return [[np.array(o[i]) for i in range(len(images))] for o in p.run()]


def test_dali_ops_match_the_reference(photos_u8):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    from byolfast.pipeline import dali_augment as A

    images = [np.ascontiguousarray(photos_u8[i].permute(1, 2, 0).numpy()) for i in range(4)]
    cases = [(op, v) for op, values in OP_VALUES for v in (values[0], values[-1])]

    def graph(img):
        return tuple(A._jitter_op(img, op, {NAMES[op]: v}, exact_hue=True, color_ops="deepmind") for op, v in cases)

    out = _dali_run(images, graph)
    for k, (op, v) in enumerate(cases):
        for i, img in enumerate(images):
            expected = ref_op(img / 255.0, op, v) * 255.0
            diff = np.abs(out[k][i].astype(np.float64) - expected)
            assert diff.max() <= 0.5 + 1e-3, f"{NAMES[op]} {v}: max {diff.max()}"   # one rounding
    # and DALI's own ops are not these: fn.hsv's saturation is torchvision's blend with the luma
    hsv = _dali_run(images[:1], lambda img: fn.hsv(img, saturation=0.8))[0][0].astype(np.float64)
    assert np.abs(hsv - ref_op(images[0] / 255.0, SATURATION, 0.8) * 255.0).max() > 3


def test_dali_cpu_kernel_matches_the_reference_and_the_graph_ops(photos_u8):
    """The CPU operator (`CpuAugment`, float32, never rounded) and the GPU's graph ops (rounded after every op), from
    the same draws of the reference's ranges, against the numpy reference (blur, solarize and flip off, identity
    normalisation, so the operator's output is the jittered image on [0, 1])."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    from byolfast.pipeline import dali_augment as A

    spec = ViewSpec()
    images = [np.ascontiguousarray(photos_u8[i % 4].permute(1, 2, 0).numpy()) for i in range(16)]
    ranges = jitter_ranges(spec, "deepmind")

    def graph(img):
        jitter = fn.random.coin_flip(probability=0.8, dtype=types.BOOL)
        gray = fn.random.coin_flip(probability=0.2, dtype=types.BOOL)
        order = fn.random.uniform(values=list(range(24)), dtype=types.INT32)
        factors = {name: fn.random.uniform(range=list(ranges[name])) for name in A.JITTER_OPS}
        drawn = {"jitter": jitter, "order": order, "grayscale": gray, **factors, "blur": 0.0, "sigma": 1.0,
                 "solarize": 0.0, "flip": 0.0}
        kernel = A.cpu_augment_view(img, spec, drawn, 224, (0.0,) * 3, (1.0,) * 3, threads=2, color_ops="deepmind")
        ops = img
        if jitter:
            ops = A.color_jitter(ops, order, factors, color_ops="deepmind")
        if gray:
            ops = A.grayscale(ops)
        return (kernel, ops, jitter, gray, order) + tuple(factors[name] for name in A.JITTER_OPS)

    kernel, ops, jitter, gray, order, *factors = _dali_run(images, graph, seed=5, conditionals=True)
    assert 0 < sum(bool(j) for j in jitter) < 16
    for i, img in enumerate(images):
        expected = img / 255.0
        if jitter[i]:
            values = {op: float(factors[op][i]) for op in range(4)}
            expected = ref_jitter(expected, A.JITTER_ORDERS[int(order[i])], values, spec)
        if gray[i]:
            expected = np.clip(np.repeat((expected @ np.array([0.2989, 0.587, 0.114]))[..., None], 3, -1), 0, 1)
        expected = expected * 255.0
        diff = np.abs(kernel[i].astype(np.float64) * 255.0 - expected)
        assert diff.max() <= 0.01, f"sample {i}: kernel {diff.max()}"   # float32 arithmetic, no rounding
        # the graph ops round after each op (and DALI's own luma weighs red 0.299): a few levels in a chain
        diff = np.abs(ops[i].astype(np.float64) - expected)
        assert diff.mean() < 0.6 and np.percentile(diff, 99) <= 3, f"sample {i}: graph {diff.mean()}, {diff.max()}"


def test_dali_draw_ranges():
    """`augment_view`'s jitter draws (1000 samples) in each maths' ranges; one seed, the same draws in both."""
    pytest.importorskip("nvidia.dali")
    from byolfast.pipeline import dali_augment as A

    spec = ViewSpec()
    images = [np.zeros((8, 8, 3), np.uint8)] * 1000
    names = ("order",) + A.JITTER_OPS
    drawn = {}
    for color_ops in COLOR_OPS:
        def graph(img, color_ops=color_ops):
            draws: dict = {}
            A.augment_view(img, spec, 8, (0.0,) * 3, (1.0,) * 3, draws=draws, cpu_threads=1, color_ops=color_ops)
            return tuple(draws[name] for name in names)

        out = _dali_run(images, graph, conditionals=True)
        drawn[color_ops] = {name: np.array(v, dtype=np.float64).ravel() for name, v in zip(names, out)}
        for name in A.JITTER_OPS:
            lo, hi = jitter_ranges(spec, color_ops)[name]
            v = drawn[color_ops][name]
            assert v.min() >= lo and v.max() <= hi, f"{color_ops} {name}"
            assert v.min() < lo + 0.02 * (hi - lo) and v.max() > hi - 0.02 * (hi - lo), f"{color_ops} {name}"
            assert abs(v.mean() - (lo + hi) / 2) < 4 * ((hi - lo) / math.sqrt(12)) / math.sqrt(len(v)), name
    dm, tv = drawn["deepmind"], drawn["torchvision"]
    np.testing.assert_allclose(dm["brightness"], tv["brightness"] - 1.0, atol=1e-6, rtol=0)
    for name in ("order", "contrast", "saturation", "hue"):
        assert np.array_equal(dm[name], tv[name]), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dali_ops_on_gpu_match_cpu(photos_u8):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    from byolfast.pipeline import dali_augment as A

    images = [np.ascontiguousarray(photos_u8[i].permute(1, 2, 0).numpy()) for i in range(4)]
    cases = [(op, v) for op, values in OP_VALUES for v in (values[0], values[-1])]

    def run(device: str) -> list:
        @pipeline_def
        def pipe():
            img = fn.external_source(source=lambda: images, batch=True, layout="HWC")
            img = img.gpu() if device == "gpu" else img
            return tuple(A._jitter_op(img, op, {NAMES[op]: v}, color_ops="deepmind") for op, v in cases)

        p = pipe(batch_size=4, num_threads=2, device_id=0 if device == "gpu" else None, seed=0)
        p.build()
        return [[np.array((o.as_cpu() if device == "gpu" else o)[i]) for i in range(4)] for o in p.run()]

    for k, (a, b) in enumerate(zip(run("cpu"), run("gpu"))):
        for x, y in zip(a, b):
            diff = np.abs(x.astype(np.int16) - y.astype(np.int16))
            assert diff.max() <= 1 and diff.mean() < 0.05, f"{cases[k]}: max {diff.max()}, mean {diff.mean()}"
