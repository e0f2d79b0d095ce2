"""The numba resize of the random resized crop (`pipeline.resample`) against PIL's antialiased bicubic (what
torchvision's `resized_crop` does to PIL images): downscaling, upscaling, thin and whole windows, odd sizes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from byolfast.pipeline.resample import coefficients, resize_crop


def _pil(img: np.ndarray, top: int, left: int, height: int, width: int, size: tuple[int, int]) -> np.ndarray:
    box = Image.fromarray(img).crop((left, top, left + width, top + height))
    return np.asarray(box.resize((size[1], size[0]), Image.Resampling.BICUBIC)).astype(np.float64)


@pytest.mark.parametrize("window,size", [
    ((0, 0, 512, 512), (224, 224)),      # the whole photograph, 2.3x down
    ((40, 100, 300, 180), (224, 224)),   # down in y, up in x
    ((200, 250, 60, 90), (224, 224)),    # a small window, up 2.5-3.7x
    ((7, 3, 511 - 7, 31), (37, 53)),     # thin, odd sizes, to the bottom edge
    ((100, 100, 1, 1), (9, 9)),          # one pixel
    ((6, 36, 506, 325), (224, 224)),     # both shrink, the rows far more: Pillow runs the rows' pass first
    ((36, 6, 325, 506), (224, 224)),     # the same, turned: the columns' pass first
])
def test_resize_crop_is_pils_antialiased_bicubic(window, size):
    img = data.astronaut()
    out = np.empty((*size, 3), dtype=np.float32)
    resize_crop(out, img, *window)
    ref = _pil(img, *window, size)
    diff = np.abs(out.astype(np.float64) * 255 - ref)
    assert diff.max() < 2.01 and (diff > 0.5).mean() < 0.001, f"max {diff.max()}, {(diff > 0.5).mean():.4f} off"
    assert np.allclose(out * 255, np.round(out * 255), atol=1e-3), "whole grey levels, as PIL's uint8 result"
    assert out.min() >= 0 and out.max() <= 1


def test_a_window_ignores_the_pixels_around_it():
    """torchvision crops first, then resizes: a window's output does not depend on what lies outside it."""
    img = data.astronaut().copy()
    out, again = np.empty((32, 32, 3), np.float32), np.empty((32, 32, 3), np.float32)
    resize_crop(out, img, 100, 100, 200, 150)
    img[:100], img[300:], img[:, :100], img[:, 250:] = 0, 255, 0, 255
    resize_crop(again, img, 100, 100, 200, 150)
    assert np.array_equal(out, again)


def test_coefficients_are_normalised_and_widen_when_downscaling():
    bounds, weights = coefficients(500, 224)
    assert np.allclose(weights.sum(1), 1, atol=1e-6)
    assert bounds[:, 1].max() > 4, "downscaling widens the cubic's support (antialiasing)"
    bounds, weights = coefficients(50, 224)
    assert bounds[:, 1].max() <= 4 and np.allclose(weights.sum(1), 1, atol=1e-6)
    assert (bounds[:, 0] >= 0).all() and (bounds.sum(1) <= 50).all()


@pytest.mark.parametrize("shape", [(375, 500), (500, 375)])
def test_random_resized_crop_windows_match_pil(shape):
    """RandomResizedCrop's windows (area 8-100 %, aspect 3/4-4/3) of a landscape and a portrait photograph to 224 px:
    PIL's pixels, bar a half-way rounding here and there."""
    img = np.asarray(Image.fromarray(data.coffee()).resize((shape[1], shape[0])))
    rng = np.random.default_rng(0)
    out = np.empty((224, 224, 3), np.float32)
    diffs = []
    for _ in range(40):
        area = rng.uniform(0.08, 1) * img.shape[0] * img.shape[1]
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = min(int(round(np.sqrt(area * aspect))), img.shape[1])
        h = min(int(round(np.sqrt(area / aspect))), img.shape[0])
        top, left = int(rng.integers(0, img.shape[0] - h + 1)), int(rng.integers(0, img.shape[1] - w + 1))
        resize_crop(out, img, top, left, h, w)
        diffs.append(np.abs(out.astype(np.float64) * 255 - _pil(img, top, left, h, w, (224, 224))))
    d = np.stack(diffs)
    assert (d > 0.5).mean() < 0.001 and d.max() < 2.01, f"{(d > 0.5).mean():.4f} of the pixels differ, max {d.max()}"


def test_the_kernels_refuse_what_they_would_read_out_of_bounds():
    """The numba kernels do not check their reads: their Python callers refuse a blur radius as large as the image
    and a crop window outside the decoded image."""
    import torch

    from byolfast.pipeline import cpu_augment
    from byolfast.pipeline.config import ViewSpec
    from byolfast.pipeline.device_augment import BatchedViewAugment

    spec, mean, std = ViewSpec(), np.zeros(3, np.float32), np.ones(3, np.float32)
    crops = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    params = BatchedViewAugment(spec, mean, std, 8).sample_params(2, "cpu", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="radius"):
        cpu_augment.augment_crops(crops, params, spec, "deepmind", False, 17, mean, std)
    assert cpu_augment.augment_crops(crops, params, spec, "deepmind", False, 15, mean, std).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="draws for 2 samples, 3 crops"):
        cpu_augment.augment_crops(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), params, spec, "deepmind", False, 15,
                                  mean, std)
    out = np.empty((8, 8, 3), np.float32)
    for window in ((0, 0, 513, 100), (0, 450, 100, 63), (-1, 0, 10, 10), (0, 0, 0, 4)):
        with pytest.raises(ValueError, match="outside"):
            resize_crop(out, data.astronaut(), *window)
    dali_augment = pytest.importorskip("byolfast.pipeline.dali_augment", reason="DALI is not installed")
    body = dali_augment.CpuCropAugment(1, 8, 3, 0.5, (0.0,) * 3, (1.0,) * 3)
    params = [np.zeros(cpu_augment.VIEW_PARAMS, np.float32)]
    image = [np.zeros((20, 30, 3), np.uint8)]
    assert body(image, [np.array([0, 0, 20, 30], np.int32)], params)[0].shape == (8, 8, 3)
    for window in ([5, 0, 16, 30], [0, -1, 10, 10], [0, 25, 10, 6], [0, 0, 0, 5]):
        with pytest.raises(ValueError, match="outside"):
            body(image, [np.array(window, np.int32)], params)
