"""The DALI backend on the CPU: contract for both sources, sharding, determinism, resume, the per-sample draws'
statistics, the augmentation ops against torchvision, bad files; and the `mixed` (nvJPEG) path where CUDA exists.

Images are real photographs (skimage) cut into small JPEGs in temporary folders; views are 32 px (8 px for the
statistics, which only need the draws). Every DALI pipeline here runs with 2 threads. Tests of ordering and sharding
use the cheaper `fn.hsv` hue (`exact_hue=False`, a smaller graph that builds faster); the contract, the statistics
and the op checks run the default exact hue.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from byolfast.pipeline.config import DaliConfig, DataConfig
from byolfast.pipeline.contract import Batch, DataError, LoaderContext, check_batch
from byolfast.pipeline.backends.dali.format import write_shards
from byolfast.pipeline.backends.dali import loader as dali_loader
from byolfast.pipeline.backends.dali import image_files
from byolfast.pipeline.backends.dali.loader import DaliTwoViewLoader, StreamHold, is_shard_folder
from byolfast.pipeline.device_augment import jitter_ranges
from byolfast.pipeline.backends.dali.image_files import image_file_ok
from byolfast.pipeline.folder import scan_image_folder
from byolfast.pipeline.sharding import epoch_permutation

SIZE = 32
BATCH = 8
PHOTOS = {"astronaut": data.astronaut, "cat": data.chelsea, "coffee": data.coffee}


def _write_tree(root: Path, per_class: int, size: tuple[int, int] = (40, 65), seed: int = 0) -> Path:
    """root/<class>/<n>.jpg: random crops of one photograph per class, sides drawn from `size`."""
    rng = np.random.default_rng(seed)
    for cname, load in PHOTOS.items():
        photo = Image.fromarray(load())
        photo.thumbnail((6 * size[1], 6 * size[1]))  # crops of >= 1/3 still downscale to the final size
        (root / cname).mkdir(parents=True)
        for n in range(per_class):
            w, h = photo.size
            cw, ch = int(rng.integers(w // 3, w)), int(rng.integers(h // 3, h))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((int(rng.integers(*size)), int(rng.integers(*size))))
            out.save(root / cname / f"{n:04d}.jpg", quality=90)
    return root


def _write_shard_folder(tree: Path, out: Path, shard_size: int) -> Path:
    samples, classes = scan_image_folder(tree)
    refs = [(p, 0, os.path.getsize(p), c) for p, c in samples]
    write_shards(out, refs, classes, shard_size, settings={"test": True})
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _write_tree(tmp_path_factory.mktemp("folder"), per_class=16)  # 48 images


@pytest.fixture(scope="module")
def shards(tree, tmp_path_factory) -> Path:
    return _write_shard_folder(tree, tmp_path_factory.mktemp("shards") / "dali", shard_size=10)  # 5 tars


@pytest.fixture(scope="module")
def scan_classes(tree) -> torch.Tensor:
    samples, _ = scan_image_folder(tree)
    return torch.tensor([c for _, c in samples])


def _cfg(path: Path, image_size: int = SIZE, **dali) -> DataConfig:
    return DataConfig(backend="dali", path=str(path), image_size=image_size,
                      dali=DaliConfig(**{"num_threads": 2, "decoder": "cpu", **dali}))


def _epoch(loader: DaliTwoViewLoader, epoch: int, start: int = 0) -> list:
    loader.set_epoch(epoch, start)
    return [Batch(*(t.clone() for t in b)) for b in loader]


@pytest.mark.parametrize("source,random_crop_decoder", [("folder", False), ("shards", True)])
def test_contract(request, scan_classes, source, random_crop_decoder):
    path = request.getfixturevalue("tree" if source == "folder" else "shards")
    ctx = LoaderContext(batch_size=BATCH, seed=3)
    loader = DaliTwoViewLoader(_cfg(path, random_crop_decoder=random_crop_decoder), ctx)
    assert loader.num_samples == 48 and len(loader) == 6
    batches = _epoch(loader, 0)
    assert len(batches) == 6
    mean, std = torch.tensor(loader.cfg.augment.mean), torch.tensor(loader.cfg.augment.std)
    lo, hi = ((0 - mean) / std).min().item(), ((1 - mean) / std).max().item()
    for b in batches:
        check_batch(b, ctx, SIZE)
        assert torch.isfinite(b.view1).all() and b.view1.min() >= lo - 1e-3 and b.view1.max() <= hi + 1e-3
        assert (b.view1 - b.view2).abs().mean() > 0.05, "the two views should differ"
        assert torch.equal(b.labels, scan_classes[b.index]), "labels must be the classes of the indices"
    seen = torch.cat([b.index for b in batches])
    assert len(set(seen.tolist())) == 48, "one epoch visits every sample once"
    assert loader.stats()["decoder"] == "cpu" and loader.stats()["bad_images"] == 0


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_two_ranks_are_disjoint_and_cover_the_kept_samples(request, source):
    path = request.getfixturevalue("tree" if source == "folder" else "shards")
    batch = 5  # 48 samples, 2 ranks x 5: 4 steps, 8 samples left out
    shares = []
    for rank in range(2):
        ctx = LoaderContext(batch_size=batch, rank=rank, world_size=2, seed=1)
        loader = DaliTwoViewLoader(_cfg(path), ctx, exact_hue=False)
        assert len(loader) == 4
        shares.append(set(torch.cat([b.index for b in _epoch(loader, 2)]).tolist()))
    assert all(len(s) == 20 for s in shares) and not shares[0] & shares[1]
    assert shares[0] | shares[1] <= set(range(48))
    if source == "folder":  # exactly the shared epoch permutation minus its drop_last tail
        assert shares[0] | shares[1] == set(epoch_permutation(48, 1, 2)[:40].tolist())


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_determinism_epochs_and_resume(request, source):
    path = request.getfixturevalue("tree" if source == "folder" else "shards")
    ctx = LoaderContext(batch_size=BATCH, seed=7)
    full = _epoch(DaliTwoViewLoader(_cfg(path), ctx, exact_hue=False), 0)
    loader = DaliTwoViewLoader(_cfg(path), ctx, exact_hue=False)
    again = _epoch(loader, 0)
    for x, y in zip(full, again):  # same seed, same batches
        assert all(torch.equal(s, t) for s, t in zip(x, y))
    tail = _epoch(loader, 0, start=4)
    assert len(tail) == 2 and loader.start_batch == 0, "start_batch applies to one iteration only"
    for x, y in zip(full[4:], tail):
        assert torch.equal(x.index, y.index)  # the order resumes exactly
        if source == "shards":  # the shard source replays the skipped batches: the draws match too
            assert torch.equal(x.view1, y.view1) and torch.equal(x.view2, y.view2)
    assert _epoch(loader, 0, start=6) == []
    nxt = _epoch(loader, 1)
    assert not torch.equal(torch.cat([x.index for x in full]), torch.cat([x.index for x in nxt])), "reshuffled"
    other = _epoch(DaliTwoViewLoader(_cfg(path), LoaderContext(batch_size=BATCH, seed=8), exact_hue=False), 0)
    assert not torch.equal(full[0].view1, other[0].view1)


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_the_next_epochs_pipeline_is_built_ahead_and_gives_the_same_batches(request, source):
    path = request.getfixturevalue("tree" if source == "folder" else "shards")
    ctx = LoaderContext(batch_size=BATCH, seed=5)
    fresh = DaliTwoViewLoader(_cfg(path, build_ahead=0), ctx, exact_hue=False)
    ahead = DaliTwoViewLoader(_cfg(path, build_ahead=3), ctx, exact_hue=False)
    for epoch in range(3):
        got, want = _epoch(ahead, epoch), _epoch(fresh, epoch)
        assert len(got) == len(want) == 6
        for x, y in zip(got, want):
            assert all(torch.equal(s, t) for s, t in zip(x, y)), f"epoch {epoch}"
    assert ahead.stats()["epochs_built_ahead"] == 2 and fresh.stats()["epochs_built_ahead"] == 0
    assert ahead._ahead is not None and ahead._ahead.key == (3, 0)

    # another epoch or start than the one built ahead: that pipeline is dropped, the batches are the asked ones
    for x, y in zip(_epoch(ahead, 4, start=2), _epoch(fresh, 4, start=2)):
        assert torch.equal(x.index, y.index) and torch.equal(x.view1, y.view1)
    assert ahead.stats()["epochs_built_ahead"] == 2

    ahead.stop_epoch = 6   # the trainer's schedule ends the run with epoch 5: nothing is built beyond it
    _epoch(ahead, 5)
    assert ahead._ahead is None

    ahead.stop_epoch = None   # closed while the next epoch's build is in flight: no thread is left behind
    ahead.set_epoch(0)
    it = iter(ahead)
    for _ in range(4):
        next(it)
    assert ahead._ahead is not None
    ahead.close()
    assert ahead._ahead is None
    assert not [t for t in threading.enumerate() if t.name.startswith("dali-build-ahead")]


def test_a_failed_build_ahead_is_built_again_when_its_epoch_starts(tree, caplog):
    ctx = LoaderContext(batch_size=BATCH, seed=5)
    loader = DaliTwoViewLoader(_cfg(tree, build_ahead=2), ctx, exact_hue=False)
    want = _epoch(DaliTwoViewLoader(_cfg(tree, build_ahead=0), ctx, exact_hue=False), 1)
    real_open = loader._open

    def failing_ahead(epoch, start, error):
        if threading.current_thread().name.startswith("dali-build-ahead"):
            raise error
        return real_open(epoch, start)

    loader._open = lambda epoch, start: failing_ahead(epoch, start, RuntimeError("out of memory"))
    _epoch(loader, 0)
    with caplog.at_level(logging.WARNING):
        got = _epoch(loader, 1)   # built again, alone
    assert "the pipeline built ahead for epoch 1 failed (out of memory); building it now" in caplog.text
    assert [b.index.tolist() for b in got] == [b.index.tolist() for b in want]
    assert loader.stats()["epochs_built_ahead"] == 0
    loader._open = lambda epoch, start: failing_ahead(epoch, start, DataError("a corrupt file"))
    _epoch(loader, 2)   # builds epoch 3's pipeline ahead, which fails on the data
    with pytest.raises(DataError, match="a corrupt file"):   # the data's problem: a new build would meet it too
        _epoch(loader, 3)
    loader.close()


@pytest.fixture(scope="module")
def many_tiny(tmp_path_factory) -> Path:
    return _write_tree(tmp_path_factory.mktemp("tiny"), per_class=1024, size=(12, 29))  # 3072 images


def test_draw_statistics_per_view(many_tiny):
    """Rates of every per-sample coin over 3072 draws per view; tolerance 0.035 (>= 3.8 sigma for every rate)."""
    ctx = LoaderContext(batch_size=512, seed=11)
    loader = DaliTwoViewLoader(_cfg(many_tiny, image_size=8, random_crop_decoder=False), ctx, debug_params=True)
    draws: dict[str, list] = {}
    for batch, params in loader.iter_with_params():
        for k, v in params.items():
            draws.setdefault(k, []).append(v)
        gray = params["view2/gray"].bool()
        rgb = batch.view2.float() * torch.tensor(loader.cfg.augment.std).view(1, 3, 1, 1) \
            + torch.tensor(loader.cfg.augment.mean).view(1, 3, 1, 1)
        spread = (rgb.amax(1) - rgb.amin(1)).flatten(1).amax(1)
        assert (spread[gray] < 2.5 / 255).all(), "a grayscale draw gives equal channels"
        assert (spread[~gray] > 2.5 / 255).float().mean() > 0.9
    d = {k: torch.cat(v).float() for k, v in draws.items()}
    assert len(d["view1/flip"]) == 3072
    aug = loader.cfg.augment
    for v, spec in ((1, aug.view1), (2, aug.view2)):
        for name, p in (("flip", spec.flip_p), ("jitter", spec.jitter_p), ("gray", spec.grayscale_p),
                        ("blur", spec.blur_p), ("solarize", spec.solarize_p)):
            rate = d[f"view{v}/{name}"].mean().item()
            assert abs(rate - p) < 0.035, f"view{v} {name}: rate {rate:.3f}, expected {p}"
        for name in ("brightness", "contrast", "saturation"):   # the default maths: a delta, two factors
            lo, hi = jitter_ranges(spec, aug.color_ops)[name]
            f = d[f"view{v}/{name}"]
            assert f.min() >= lo and f.max() <= hi and abs(f.mean().item() - (lo + hi) / 2) < 0.02
        hue = d[f"view{v}/hue"]
        assert hue.abs().max() <= spec.hue and hue.std() > 0.8 * spec.hue / math.sqrt(3)
        sigma = d[f"view{v}/sigma"]
        assert sigma.min() >= spec.blur_sigma[0] and sigma.max() <= spec.blur_sigma[1]
        orders = d[f"view{v}/order"][d[f"view{v}/jitter"].bool()].long()
        counts = torch.bincount(orders, minlength=24)
        assert len(counts) == 24 and (counts > 0).all(), "every one of the 24 jitter orders occurs"
        assert counts.max() < 3 * counts.float().mean(), "orders are drawn uniformly"
        # crop windows: area fraction and aspect ratio as RandomResizedCrop (integer windows: small rounding slack)
        h, w = d[f"view{v}/crop_shape"][:, 0], d[f"view{v}/crop_shape"][:, 1]
        img_area = d["image_shape"][:, 0] * d["image_shape"][:, 1]
        area, aspect = h * w / img_area, w / h
        inside = (area > spec.crop_scale[0] * 0.8) & (area <= 1) & (aspect > spec.crop_ratio[0] * 0.8) \
            & (aspect < spec.crop_ratio[1] * 1.25)
        assert inside.float().mean() > 0.97
        assert area.mean() > 0.3 and area.std() > 0.15, "areas spread over [0.08, 1]"
        assert (d[f"view{v}/crop_anchor"] >= 0).all()
    assert not torch.equal(d["view1/flip"], d["view2/flip"]), "the views draw independently"


def _run_ops(files: list[str], device: str) -> list[list[np.ndarray]]:
    """The augmentation ops with fixed factors on `files`, on the CPU or the GPU: [op][sample] uint8 HWC arrays."""
    from nvidia.dali import fn, pipeline_def, types

    from byolfast.pipeline import dali_augment as A

    @pipeline_def
    def ops():
        jpegs, _ = fn.readers.file(files=files, name="Reader")
        img = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        img = img.gpu() if device == "gpu" else img
        return (img, fn.brightness_contrast(img, brightness=1.3), A.adjust_contrast(img, 0.6),
                A.adjust_contrast(img, 1.4), fn.hsv(img, saturation=0.8), A.grayscale(img), A.solarize(img, 0.5),
                A.gaussian_blur(img, 1.5, 23), A.adjust_hue(img, 0.1), A.adjust_hue(img, -0.07))

    pipe = ops(batch_size=len(files), num_threads=2, device_id=0 if device == "gpu" else None, seed=0)
    pipe.build()
    out = [o.as_cpu() if device == "gpu" else o for o in pipe.run()]
    return [[np.array(o[i]) for i in range(len(files))] for o in out]


def test_augment_ops_match_torchvision(tree):
    """The DALI ops against torchvision's functional ops on real photographs (fixed factors)."""
    import torchvision.transforms.v2.functional as F

    files = [p for p, _ in scan_image_folder(tree)[0]][::6]
    out = _run_ops(files, "cpu")
    refs = (lambda x: F.adjust_brightness(x, 1.3), lambda x: F.adjust_contrast(x, 0.6),
            lambda x: F.adjust_contrast(x, 1.4), lambda x: F.adjust_saturation(x, 0.8),
            lambda x: F.rgb_to_grayscale(x, 3), lambda x: F.solarize(x, 0.5),
            lambda x: F.gaussian_blur(x, [23, 23], [1.5, 1.5]), lambda x: F.adjust_hue(x, 0.1),
            lambda x: F.adjust_hue(x, -0.07))
    for i in range(len(files)):
        img = torch.from_numpy(out[0][i]).permute(2, 0, 1).float() / 255  # torchvision on [0, 1] floats
        for k, ref in enumerate(refs):
            got = torch.from_numpy(out[k + 1][i]).permute(2, 0, 1).float()
            diff = (got - ref(img) * 255).abs()
            if k == 5:
                assert diff.max() < 1e-3, "solarize is exact"
            else:  # uint8 rounding after each op
                assert diff.max() <= 1.5 and diff.mean() < 0.5, f"op {k}: max {diff.max()}, mean {diff.mean()}"


def test_cpu_kernel_matches_the_graph_ops(tree):
    """On the CPU every op after the crop runs as one numba operator (`CpuAugment`, float32); on the GPU as DALI's
    graph ops (uint8, rounded after every op). Both from the same per-sample draws of `draw_view` (view 1 with
    solarize and view 2's blur probability, so every op is drawn somewhere) on real photographs: the same images, up
    to the graph's rounding. torchvision's maths here; the reference's in `tests/test_color_ops.py`."""
    from nvidia.dali import fn, pipeline_def, types

    from byolfast.pipeline import dali_augment as A
    from byolfast.pipeline.config import ViewSpec

    spec = ViewSpec(blur_p=0.5, solarize_p=0.3)
    files = [p for p, _ in scan_image_folder(tree)[0]]
    names = ("jitter", "grayscale", "blur", "solarize", "flip")

    @pipeline_def(enable_conditionals=True)
    def both():
        jpegs, _ = fn.readers.file(files=files, name="Reader")
        img = fn.resize(fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), size=[SIZE, SIZE])
        drawn = A.draw_view(spec, "torchvision")
        kernel, graph = (A.apply_view(img, spec, drawn, SIZE, (0.0,) * 3, (1.0,) * 3, cpu_threads=threads,
                                      color_ops="torchvision") for threads in (2, 0))
        return (img, kernel, graph) + tuple(drawn[name] for name in names)

    pipe = both(batch_size=len(files), num_threads=2, device_id=None, seed=5)
    pipe.build()
    img, kernel, graph, *coins = pipe.run()
    coins = {name: np.array([bool(np.array(c[i])) for i in range(len(files))]) for name, c in zip(names, coins)}
    for name, c in coins.items():
        assert 0 < c.sum() < len(files), f"every op is drawn on some samples and not on others: {name}"
    for i in range(len(files)):
        k, g = np.array(kernel[i]).astype(float) * 255, np.array(graph[i]).astype(float) * 255
        assert k.shape == g.shape == (SIZE, SIZE, 3)
        diff = np.abs(k - g)
        assert diff.mean() < 0.6 and np.percentile(diff, 99) <= 3, f"sample {i}: {diff.mean()}, {diff.max()}"
        if not any(c[i] for c in coins.values()):
            assert np.abs(k - np.array(img[i])).max() < 1e-3, "no op drawn: the image itself"


def test_cpu_crop_is_pils_antialiased_bicubic_of_the_drawn_window(tree):
    """On the CPU the crop's resize runs inside the numba operator (`CpuCropAugment`): with every other op off and
    an identity normalisation, each view is PIL's antialiased bicubic resize of the window the loader drew
    (torchvision's `resized_crop`, the torch backend's), from PIL's decode of the same file."""
    from byolfast.pipeline.config import AugmentConfig, ViewSpec

    off = ViewSpec(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    cfg = _cfg(tree, image_size=SIZE, random_crop_decoder=False)
    cfg.augment = AugmentConfig(view1=off, view2=off, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    loader = DaliTwoViewLoader(cfg, LoaderContext(batch_size=BATCH, seed=3), debug_params=True)
    paths = [p for p, _ in scan_image_folder(tree)[0]]
    batch, params = next(iter(loader.iter_with_params()))
    diffs = []
    for v, view in ((1, batch.view1), (2, batch.view2)):
        for k in range(BATCH):
            top, left = (int(t) for t in params[f"view{v}/crop_anchor"][k])
            h, w = (int(t) for t in params[f"view{v}/crop_shape"][k])
            img = Image.open(paths[int(batch.index[k])]).convert("RGB")
            ref = np.asarray(img.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
            diffs.append(np.abs(view[k].permute(1, 2, 0).float().numpy() * 255 - ref))
    loader.close()
    d = np.stack(diffs)
    assert d.mean() < 0.08 and np.percentile(d, 99) <= 2, f"mean {d.mean():.3f}, max {d.max():.1f}"


def test_dali_copies_a_python_functions_outputs_before_the_next_call():
    """`CpuAugment` reuses its output arrays from one call to the next: safe only because DALI copies what a python
    function returns before it calls it again, even with iterations run ahead (prefetch 3): each batch keeps its own
    values."""
    from nvidia.dali import fn, pipeline_def

    buffers = [np.zeros((4, 4, 3), np.float32) for _ in range(2)]
    calls = [0]

    def body(images):
        calls[0] += 1
        for b in buffers:
            b[...] = calls[0]
        return buffers[:len(images)]

    fed = [0]

    def source():
        fed[0] += 1
        return [np.full((4, 4, 3), fed[0], np.uint8) for _ in range(2)]

    @pipeline_def(batch_size=2, num_threads=2, device_id=None, exec_dynamic=True, prefetch_queue_depth=3)
    def pipe():
        x = fn.external_source(source=source, batch=True, layout="HWC")
        return fn.python_function(x, function=body, batch_processing=True, output_layouts="HWC")

    p = pipe()
    p.build()
    first = p.run()[0]   # read only after the iterations run ahead have called the function again
    deadline = time.monotonic() + 20
    while calls[0] < 3 and time.monotonic() < deadline:   # the iterations run ahead fill in (slowly on a busy host)
        time.sleep(0.01)
    assert calls[0] >= 3, "DALI ran two iterations ahead of the first batch read"
    got = [float(np.array(first[0]).ravel()[0])] + [float(np.array(p.run()[0][0]).ravel()[0]) for _ in range(4)]
    assert got == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_bad_files_are_left_out_and_counted(tmp_path, tree):
    root = tmp_path / "bad"
    for cname in ("a", "b"):
        (root / cname).mkdir(parents=True)
        for n, src in enumerate(sorted((tree / "cat").iterdir())[:10]):
            (root / cname / f"{n}.jpg").write_bytes(src.read_bytes())
    good = (root / "a" / "0.jpg").read_bytes()
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "text.jpg").write_bytes(b"not an image at all")
    (root / "b" / "cut.jpg").write_bytes(good[: len(good) // 2])
    # a complete JPEG followed by 5 kB of something else, as phones write them: not damage, and DALI decodes it
    (root / "b" / "appended.jpg").write_bytes(good + b"\x00\x00\x00\x18ftypmp42" + bytes(5000))
    assert image_file_ok(str(root / "a" / "0.jpg")) and not image_file_ok(str(root / "b" / "cut.jpg"))
    assert image_file_ok(str(root / "b" / "appended.jpg"))
    progressive = io.BytesIO()
    Image.open(root / "a" / "0.jpg").save(progressive, "JPEG", progressive=True, quality=90)
    data = progressive.getvalue()
    assert image_files.jpeg_reaches_its_end(data + bytes(2000))
    assert not any(image_files.jpeg_reaches_its_end(data[:k]) for k in (len(data) // 3, len(data) - 2))
    with pytest.raises(DataError, match="max_bad_fraction"):
        DaliTwoViewLoader(_cfg(root), LoaderContext(batch_size=4))
    cfg = _cfg(root)
    cfg.max_bad_fraction = 0.2
    loader = DaliTwoViewLoader(cfg, LoaderContext(batch_size=4), exact_hue=False)
    assert loader.stats()["bad_images"] == 3 and loader.num_samples == 21
    assert sorted(Path(p).name for p in loader.stats()["bad_paths"]) == ["cut.jpg", "empty.jpg", "text.jpg"]
    assert loader.stats()["bad_reasons"] == {"empty file": 1, "not an image (unknown signature)": 1,
                                             "cut short (no end marker)": 1}
    assert len(_epoch(loader, 0)) == 5


def test_file_check_keeps_the_order_with_few_tasks_in_flight(tmp_path, monkeypatch):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(good)
    jpeg = good.read_bytes()
    paths = [str(tmp_path / f"{n}.jpg") for n in range(5000)]
    for p in paths:
        Path(p).write_bytes(jpeg)
    Path(paths[0]).write_bytes(b"")
    Path(paths[1234]).write_bytes(b"not an image at all")
    Path(paths[4999]).write_bytes(jpeg[: len(jpeg) // 2])
    paths[2048] = str(tmp_path / "missing.jpg")
    lock, in_flight, peak = threading.Lock(), [0], [0]

    def done(_) -> None:
        with lock:
            in_flight[0] -= 1

    class CountingPool(image_files.ThreadPoolExecutor):
        def submit(self, *args, **kwargs):
            future = super().submit(*args, **kwargs)
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            future.add_done_callback(done)
            return future

    monkeypatch.setattr(image_files, "ThreadPoolExecutor", CountingPool)
    problems = image_files.check_image_files(paths, threads=3, chunk=64)
    assert problems == [image_files.image_file_problem(p) for p in paths]
    assert {i: why for i, why in enumerate(problems) if why} == {
        0: "empty file", 1234: "not an image (unknown signature)", 2048: "unreadable (No such file or directory)",
        4999: "cut short (no end marker)"}
    assert peak[0] <= 2 * 3 + 1, "a few chunks in flight, not one task per path"


def test_corrupt_image_data_raises_data_error(tmp_path, tree):
    root = tmp_path / "corrupt" / "x"
    root.mkdir(parents=True)
    for n, src in enumerate(sorted((tree / "cat").iterdir())[:3]):
        (root / f"{n}.jpg").write_bytes(src.read_bytes())
    head = (root / "0.jpg").read_bytes()[:300]
    (root / "9.jpg").write_bytes(head + np.random.default_rng(0).bytes(4000) + b"\xff\xd9")  # passes the cheap check
    loader = DaliTwoViewLoader(_cfg(root.parent), LoaderContext(batch_size=4, shuffle=False), exact_hue=False)
    with pytest.raises(DataError, match="corrupt"):
        _epoch(loader, 0)


def test_bad_settings_and_paths(tree, shards):
    with pytest.raises(DataError, match="decoder"):
        DaliTwoViewLoader(_cfg(tree, decoder="nvjpeg"), LoaderContext())
    with pytest.raises(DataError, match="fewer than one global batch"):
        DaliTwoViewLoader(_cfg(tree), LoaderContext(batch_size=64))
    with pytest.raises(DataError):
        DaliTwoViewLoader(_cfg(tree / "missing"), LoaderContext())
    assert is_shard_folder(str(shards)) and is_shard_folder(str(shards.parent))
    assert is_shard_folder(str(shards / "manifest.json")) and not is_shard_folder(str(tree))


def test_class_ordered_shards_are_pointed_out(shards, tmp_path, caplog):
    # shards of an earlier convert, in class order: still read, with advice to convert again
    DaliTwoViewLoader(_cfg(shards), LoaderContext(batch_size=BATCH))
    assert "class order" not in caplog.text
    old = tmp_path / "dali"
    shutil.copytree(shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["order"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    DaliTwoViewLoader(_cfg(old), LoaderContext(batch_size=BATCH))
    assert "class order" in caplog.text and "--overwrite" in caplog.text


class _Event:
    """A stand-in for a CUDA event: done once `finish()` is called (or on `synchronize()`)."""

    def __init__(self, log: list):
        self.log, self.done = log, False
        log.append(self)

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_stream_hold_keeps_outputs_until_their_event_passed():
    events: list[_Event] = []
    hold = StreamHold(torch.device("cuda"), new_event=lambda: _Event(events))
    hold.hold("batch 0")
    hold.hold("batch 1")
    assert len(hold) == 2                      # nothing has run on the device yet
    events[0].done = True
    hold.hold("batch 2")
    assert [o for _, o in hold._held] == ["batch 1", "batch 2"]   # released in order, once passed
    events[2].done = True                      # a later event passing does not release an earlier batch
    hold.hold("batch 3")
    assert [o for _, o in hold._held][0] == "batch 1"
    hold.drain()
    assert len(hold) == 0 and all(e.done for e in events)
    cpu = StreamHold(torch.device("cpu"), new_event=lambda: _Event(events))
    cpu.hold("x")
    assert len(cpu) == 0 and len(events) == 4   # on the CPU nothing is held, no event is made


def test_each_batch_is_held_after_its_consumer_and_drained_at_the_end(tree, monkeypatch):
    events: list[_Event] = []
    made: list[StreamHold] = []

    class Recording(StreamHold):   # the GPU bookkeeping, run on the CPU loader
        def __init__(self, device, new_event=None):
            super().__init__(torch.device("cuda"), new_event=lambda: _Event(events))
            made.append(self)

    monkeypatch.setattr(dali_loader, "StreamHold", Recording)
    loader = DaliTwoViewLoader(_cfg(tree), LoaderContext(batch_size=BATCH, shuffle=False), exact_hue=False)
    it = iter(loader)
    next(it)
    assert len(events) == 0                    # held only once the consumer asks for the next batch
    next(it)
    assert len(events) == 1 and len(made[0]) == 1
    rest = list(it)
    assert len(events) == 2 + len(rest) and all(e.done for e in events) and len(made[0]) == 0


def test_mixed_falls_back_to_cpu_without_gpu(tree, caplog):
    loader = DaliTwoViewLoader(_cfg(tree, decoder="mixed"), LoaderContext(batch_size=BATCH))
    assert loader.decoder == "cpu" and loader.device_id is None
    assert "on the CPU" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("random_crop_decoder", [False, True])
def test_mixed_decoder_on_gpu(tree, shards, scan_classes, random_crop_decoder):
    for path in (tree, shards):
        ctx = LoaderContext(device=torch.device("cuda"), dtype=torch.bfloat16, batch_size=BATCH, seed=2)
        loader = DaliTwoViewLoader(_cfg(path, decoder="mixed", random_crop_decoder=random_crop_decoder), ctx)
        assert loader.decoder == "mixed"
        batches = _epoch(loader, 0)
        assert len(batches) == 6
        for b in batches:
            check_batch(b, ctx, SIZE)
            assert b.view1.is_cuda and (b.view1 - b.view2).abs().float().mean() > 0.05
            assert torch.equal(b.labels.cpu(), scan_classes[b.index.cpu()])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_pipeline_built_ahead_on_the_consumers_stream_gives_the_same_batches(tree):
    """The next epoch's nvJPEG pipeline, built and primed in a background thread with the consumer's (non-default)
    stream current, hands out the batches a pipeline built when the epoch starts gives. (The CPU twin:
    `test_the_next_epochs_pipeline_is_built_ahead_and_gives_the_same_batches`.)"""
    def epochs(build_ahead: int) -> tuple[list[torch.Tensor], dict]:
        ctx = LoaderContext(device=torch.device("cuda"), dtype=torch.float32, batch_size=BATCH, seed=6)
        loader = DaliTwoViewLoader(_cfg(tree, decoder="mixed", hw_decoder_load=0.0, build_ahead=build_ahead), ctx)
        out = []
        with torch.cuda.stream(torch.cuda.Stream()):
            for epoch in range(3):
                loader.set_epoch(epoch)
                out += [torch.cat([b.view1, b.view2]).sum(dim=(1, 2, 3)) for b in loader]
            torch.cuda.synchronize()
        stats = loader.stats()
        loader.close()
        return [o.cpu() for o in out], stats

    (fresh, _), (ahead, stats) = epochs(0), epochs(2)
    assert stats["epochs_built_ahead"] == 2 and len(fresh) == len(ahead) == 18
    for f, a in zip(fresh, ahead):
        torch.testing.assert_close(a, f, rtol=1e-4, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_fp32_batches_survive_a_slow_consumer(tree):
    """fp32 + channels-last: the batch is DALI's own buffer (no copy). A consumer whose GPU work runs late (a sleep
    kernel queued first) must still read the batch it was given, not a later one written into the same memory."""
    def sums(slow: bool) -> list[torch.Tensor]:
        ctx = LoaderContext(device=torch.device("cuda"), dtype=torch.float32, batch_size=BATCH, seed=4,
                            shuffle=False)
        loader = DaliTwoViewLoader(_cfg(tree, decoder="mixed", hw_decoder_load=0.0), ctx)
        loader.set_epoch(0)
        out = []
        for b in loader:
            if slow:
                torch.cuda._sleep(200_000_000)   # ~0.1 s of GPU time before the batch is read
            out.append(torch.stack([b.view1.sum(dim=(1, 2, 3)), b.view2.sum(dim=(1, 2, 3))]))
        torch.cuda.synchronize()
        return [o.cpu() for o in out]

    quick, slow = sums(False), sums(True)
    assert len(quick) == len(slow) == 6
    for q, s in zip(quick, slow):
        torch.testing.assert_close(s, q, rtol=1e-4, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_ops_on_gpu_match_cpu(tree):
    files = [p for p, _ in scan_image_folder(tree)[0]][::6]
    cpu, gpu = _run_ops(files, "cpu"), _run_ops(files, "gpu")
    for k, (a, b) in enumerate(zip(cpu, gpu)):
        for x, y in zip(a, b):
            diff = np.abs(x.astype(np.int16) - y.astype(np.int16))
            assert diff.max() <= 1 and diff.mean() < 0.05, f"op {k}: max {diff.max()}, mean {diff.mean()}"
