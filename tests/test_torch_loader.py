"""The torchvision backend (contract, determinism, resume, sharding, crop statistics, bad images) and the synthetic one.

Images are real photographs (skimage's astronaut, chelsea, coffee, rocket) cut into small JPEGs in a temporary
ImageFolder tree; views are 32 px so an epoch takes well under a second.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from byolfast.pipeline.backends.torch import loader as torch_loader
from byolfast.pipeline.config import DataConfig, ViewSpec
from byolfast.pipeline.contract import DataError, LoaderContext, check_batch
from byolfast.pipeline.sharding import epoch_permutation, sample_seed
from byolfast.pipeline.backends.synthetic.loader import SyntheticTwoViewLoader
from byolfast.pipeline.backends.torch.loader import TorchTwoViewLoader, build_view_transform, load_rgb

SIZE = 32
PHOTOS = {"astronaut": data.astronaut, "cat": data.chelsea, "coffee": data.coffee}


def _write_tree(root: Path, per_class: int, seed: int = 0) -> Path:
    """root/<class>/<n>.jpg: random crops of one photograph per class, 40-64 px, varied aspect."""
    rng = np.random.default_rng(seed)
    for cname, load in PHOTOS.items():
        photo = Image.fromarray(load())
        (root / cname).mkdir(parents=True)
        for n in range(per_class):
            w, h = photo.size
            cw, ch = int(rng.integers(w // 3, w)), int(rng.integers(h // 3, h))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((int(rng.integers(40, 65)), int(rng.integers(40, 65))))
            out.save(root / cname / f"{n}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _write_tree(tmp_path_factory.mktemp("folder"), per_class=8)  # 24 images


def _cfg(path: Path, workers: int = 0, **kw) -> DataConfig:
    return DataConfig(backend="torch", path=str(path), image_size=SIZE, num_workers=workers, **kw)


def _epoch(loader, epoch: int, start: int = 0) -> list:
    loader.set_epoch(epoch, start)
    return [tuple(t.clone() for t in b) for b in loader]


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for t, u in zip(x, y):
            assert torch.equal(t, u)


def test_contract_labels_and_two_different_views(tree):
    ctx = LoaderContext(batch_size=4, seed=1)
    loader = TorchTwoViewLoader(_cfg(tree), ctx)
    assert loader.classes == sorted(PHOTOS)
    assert loader.num_samples == 24 and len(loader) == 6
    batches = list(loader)
    assert len(batches) == 6
    for b in batches:
        check_batch(b, ctx, SIZE)
        assert not torch.allclose(b.view1, b.view2)
        for i, label in zip(b.index.tolist(), b.labels.tolist()):
            assert Path(loader.samples[i][0]).parent.name == loader.classes[label]
    seen = torch.cat([b.index for b in batches])
    assert sorted(seen.tolist()) == list(range(24))
    assert loader.stats() == {"bad_images": 0, "bad_paths": []}
    loader.close()


def test_same_seed_same_batches_whatever_the_worker_count(tree):
    ctx = LoaderContext(batch_size=4, seed=5)
    no_workers = TorchTwoViewLoader(_cfg(tree, workers=0), ctx)
    two_workers = TorchTwoViewLoader(_cfg(tree, workers=2), ctx)
    try:
        ref = _epoch(no_workers, 2)
        _assert_same(ref, _epoch(two_workers, 2))
        _assert_same(ref, _epoch(two_workers, 2))  # persistent workers, second pass
        other = _epoch(no_workers, 3)
        assert not torch.equal(ref[0][3], other[0][3]), "each epoch reshuffles"
    finally:
        no_workers.close()
        two_workers.close()


def test_mid_epoch_resume_reproduces_the_rest_without_decoding_skipped(tree, monkeypatch):
    ctx = LoaderContext(batch_size=4, seed=9)
    loader = TorchTwoViewLoader(_cfg(tree), ctx)
    full = _epoch(loader, 4)
    decoded = []

    def counting_load(path):
        decoded.append(path)
        return load_rgb(path)

    monkeypatch.setattr(torch_loader, "load_rgb", counting_load)
    rest = _epoch(loader, 4, start=3)
    _assert_same(full[3:], rest)
    assert len(decoded) == 3 * 4, "only the resumed batches are decoded"
    assert len(list(loader)) == 6, "the start batch applies to one pass only"


def test_two_ranks_are_disjoint_and_cover_the_kept_samples(tree):
    cfg = _cfg(tree)
    shares = []
    for rank in range(2):
        ctx = LoaderContext(batch_size=5, seed=3, rank=rank, world_size=2)
        loader = TorchTwoViewLoader(cfg, ctx)
        assert len(loader) == 2  # 24 // (5 * 2)
        loader.set_epoch(1)
        shares.append(torch.cat([b.index for b in loader]).tolist())
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(epoch_permutation(24, 3, 1)[:20].tolist())


def _kept_area_fraction(lo: float, hi: float) -> float:
    """P(area in [lo, hi]) for RandomResizedCrop on a square image: uniform area, log-uniform ratio, rejections."""
    log_r = math.log(4 / 3)

    def accept(a: float) -> float:  # P(the crop fits | area a): |log r| <= -log a
        return min(1.0, -math.log(a) / log_r)

    grid = np.linspace(0.08, 1.0, 20001)
    dens = np.array([accept(a) for a in grid])
    inside = (grid >= lo) & (grid <= hi)
    return float(np.trapezoid(dens * inside, grid) / np.trapezoid(dens, grid))


def test_crop_area_and_aspect_statistics():
    """The first view's crop draws, seeded exactly as the loader seeds a sample, on a 1000x1000 image."""
    rrc = build_view_transform(ViewSpec(), 224, (0.5,) * 3, (0.2,) * 3).transforms[0]
    image = torch.empty((3, 1000, 1000), dtype=torch.uint8)
    n = 3000
    areas, ratios = [], []
    with torch.random.fork_rng(devices=[]):
        for index in range(n):
            torch.default_generator.manual_seed(sample_seed(11, 0, index))
            p = rrc.make_params([image])
            areas.append(p["height"] * p["width"] / 1e6)
            ratios.append(p["width"] / p["height"])
    areas, log_ratios = np.array(areas), np.log(np.array(ratios))
    assert areas.min() >= 0.08 - 2e-3 and areas.max() <= 1.0
    assert np.abs(log_ratios).max() <= math.log(4 / 3) + 1e-2
    for lo, hi in ((0.08, 0.3), (0.3, 0.6), (0.75, 1.0)):
        p = _kept_area_fraction(lo, hi)
        count = int(((areas >= lo) & (areas < hi)).sum())
        assert abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)), f"area in [{lo}, {hi}): {count}/{n}, p={p:.3f}"
    # Aspect: log-uniform, so symmetric about 0, and uniform where no crop is rejected (area < 0.75).
    small = log_ratios[areas < 0.7]
    assert abs(small.mean()) <= 4 * (2 * math.log(4 / 3) / math.sqrt(12)) / math.sqrt(len(small))
    q = float((np.abs(small) < math.log(4 / 3) / 2).mean())
    assert abs(q - 0.5) <= 4 * math.sqrt(0.25 / len(small))


def _write_bad_tree(root: Path) -> dict[str, list[Path]]:
    good = _write_tree(root, per_class=3, seed=1)  # 9 good JPEGs
    cat = good / "cat"
    astronaut = Image.fromarray(data.astronaut()).resize((48, 48))
    files = {"bad": [cat / "truncated.jpg", cat / "empty.jpg", cat / "not_an_image.jpg"],
             "odd": [cat / "cmyk.jpg", cat / "one_pixel.png", cat / "gray.png", cat / "palette.png",
                     cat / "sixteen_bit.png"]}
    astronaut.save(files["bad"][0])
    files["bad"][0].write_bytes(files["bad"][0].read_bytes()[:300])
    files["bad"][1].write_bytes(b"")
    files["bad"][2].write_text("this is a caption, not a picture\n")
    astronaut.convert("CMYK").save(files["odd"][0])
    Image.new("RGB", (1, 1), (200, 10, 10)).save(files["odd"][1])
    Image.fromarray(data.camera()).resize((40, 56)).save(files["odd"][2])
    astronaut.convert("P", palette=Image.Palette.ADAPTIVE).save(files["odd"][3])
    camera = np.asarray(Image.fromarray(data.camera()).resize((48, 48))).astype(np.uint16)
    Image.fromarray(camera * 257).save(files["odd"][4])
    return files  # 9 good + 3 bad + 5 odd-but-fine = 17 images


def test_bad_images_are_substituted_counted_and_logged_once(tmp_path, caplog):
    files = _write_bad_tree(tmp_path)
    ctx = LoaderContext(batch_size=17, seed=0)  # one batch: the whole tree each epoch
    loader = TorchTwoViewLoader(_cfg(tmp_path, max_bad_fraction=0.5), ctx)
    with caplog.at_level(logging.WARNING, logger="byolfast.pipeline.backends.torch.loader"):
        for epoch in range(2):
            loader.set_epoch(epoch)
            (batch,) = list(loader)
            check_batch(batch, ctx, SIZE)
            assert torch.isfinite(batch.view1).all() and torch.isfinite(batch.view2).all()
            shown = {Path(loader.samples[i][0]) for i in batch.index.tolist()}
            assert not shown & set(files["bad"]), "undecodable files are replaced by other samples"
            assert set(files["odd"]) <= shown, "CMYK, 1x1, gray, palette and 16-bit images decode"
    stats = loader.stats()
    assert stats["bad_images"] == 3
    assert sorted(stats["bad_paths"]) == sorted(str(p) for p in files["bad"])
    warnings = [r for r in caplog.records if "cannot decode" in r.getMessage()]
    assert len(warnings) == 3, "each bad file is logged once"

    strict = TorchTwoViewLoader(_cfg(tmp_path, max_bad_fraction=0.01), ctx)
    with pytest.raises(DataError, match="empty.jpg"):
        list(strict)


@pytest.mark.parametrize("workers", [0, 1])
def test_undecodable_batch_is_a_one_line_data_error(tmp_path, workers):
    for cname in ("a", "b"):
        (tmp_path / cname).mkdir()
        for n in range(3):
            (tmp_path / cname / f"{n}.jpg").write_text("a caption, not a picture\n")
    loader = TorchTwoViewLoader(_cfg(tmp_path, workers=workers), LoaderContext(batch_size=2))
    message = f"^cannot decode .* \\(a sample and {torch_loader.SUBSTITUTE_TRIES} substitutes; last error"
    try:
        with pytest.raises(DataError, match=message) as err:
            list(loader)
    finally:
        loader.close()
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_load_rgb_converts_modes(tmp_path):
    sixteen = tmp_path / "sixteen.png"
    Image.fromarray(np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)).save(sixteen)
    assert load_rgb(str(sixteen))[:, :, :].tolist()[0] == [[0, 128], [255, 4]]   # scaled and rounded, like convert
    small = tmp_path / "int32.tif"   # 32-bit grayscale holding 8-bit values: kept as they are, not shifted to black
    Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.int32), "I").save(small)
    assert load_rgb(str(small))[0].tolist() == [[0, 100], [200, 255]]
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 6), (0, 0, 0, 0)).save(cmyk)
    x = load_rgb(str(cmyk))
    assert x.shape == (3, 6, 8) and x.dtype == torch.uint8 and x.min() >= 250  # no ink: white


def test_load_rgb_applies_the_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view, as `byol convert` and DALI do
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = 255  # left half white: the top half once upright
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    x = load_rgb(str(tmp_path / "rotated.jpg"))
    assert x.shape == (3, 40, 20)
    assert x[:, :18].float().mean() > 240 and x[:, 22:].float().mean() < 15


def test_huge_images_are_reduced_or_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch_loader, "MAX_DECODE_PIXELS", 32 * 32)
    photo = Image.fromarray(data.astronaut()).resize((256, 192))
    photo.save(tmp_path / "big.jpg")
    photo.save(tmp_path / "big.png")
    reduced = load_rgb(str(tmp_path / "big.jpg"))
    assert reduced.shape[0] == 3 and reduced.shape[1] * reduced.shape[2] < 256 * 192
    with pytest.raises(ValueError, match="larger than"):
        load_rgb(str(tmp_path / "big.png"))


def test_too_few_images_for_a_batch_is_a_data_error(tree):
    with pytest.raises(DataError, match="fewer than one global batch"):
        TorchTwoViewLoader(_cfg(tree), LoaderContext(batch_size=16, world_size=2))


def test_synthetic_loader_keeps_the_contract():
    cfg = DataConfig(backend="synthetic", image_size=SIZE, synthetic_size=40)
    ctx = LoaderContext(batch_size=4, dtype=torch.bfloat16, rank=1, world_size=2, seed=2)
    loader = SyntheticTwoViewLoader(cfg, ctx)
    assert loader.num_samples == 40 and len(loader) == 5
    batches = list(loader)
    assert len(batches) == 5
    for b in batches:
        check_batch(b, ctx, SIZE)
        assert (b.labels == -1).all()
        assert not torch.equal(b.view1, b.view2)
        assert b.view1.float().min() >= -2.2 and b.view1.float().max() <= 2.7  # normalised [0, 1] pixels
    ids = torch.cat([b.index for b in batches]).tolist()
    assert ids == list(range(1, 40, 2)), "rank 1 of 2 gets the odd sample ids"
    assert batches[0].view1 is batches[2].view1, "a pool of batches is cycled, not regenerated"
    loader.set_epoch(1, start_batch=3)
    assert [b.index.tolist() for b in loader] == [batches[3].index.tolist(), batches[4].index.tolist()]
    with pytest.raises(DataError):
        SyntheticTwoViewLoader(DataConfig(synthetic_size=7), ctx)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_delivery_matches_cpu(tree):
    cpu_ctx = LoaderContext(batch_size=4, seed=4)
    cuda_ctx = LoaderContext(device=torch.device("cuda"), dtype=torch.bfloat16, batch_size=4, seed=4)
    cuda_loader = TorchTwoViewLoader(_cfg(tree, workers=2), cuda_ctx)  # pinned memory, non-blocking copies
    try:
        on_cuda = list(cuda_loader)
        on_cpu = list(TorchTwoViewLoader(_cfg(tree), cpu_ctx))
        for g, c in zip(on_cuda, on_cpu):
            check_batch(g, cuda_ctx, SIZE)
            assert torch.equal(g.view1.cpu(), c.view1.to(torch.bfloat16))
            assert torch.equal(g.labels.cpu(), c.labels)
    finally:
        cuda_loader.close()
    synthetic = SyntheticTwoViewLoader(DataConfig(image_size=SIZE, synthetic_size=16), cuda_ctx)
    for b in synthetic:
        check_batch(b, cuda_ctx, SIZE)
