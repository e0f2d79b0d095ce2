"""One contract, every backend: the same real photos -> `byol convert` -> each loader -> the same batch contract.

Also the convert round-trip through the real loaders: counts, labels and classes agree across backends.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from byolfast.pipeline import BACKENDS, DataConfig, LoaderContext, build_two_view_loader
from byolfast.pipeline.contract import check_batch
from byolfast.pipeline.convert import convert_dataset

SIZE, BATCH = 32, 8


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory):
    """3 classes x 8 real photo crops (64x48 JPEGs)."""
    import skimage.data

    root = tmp_path_factory.mktemp("photos") / "tree"
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    for ci, cname in enumerate(("astronaut", "chelsea", "coffee")):
        (root / cname).mkdir(parents=True)
        img = photos[ci]
        h, w = img.shape[:2]
        for k in range(8):
            y, x = (k * 23) % (h // 3), (k * 41) % (w // 3)
            Image.fromarray(img[y:y + 2 * h // 3, x:x + 2 * w // 3]).resize((64, 48), Image.BICUBIC) \
                .save(root / cname / f"{k}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def converted(photo_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    report = convert_dataset(str(photo_tree), str(out), (), workers=1, max_side=64, shard_size=10,   # every format
                             progress=False)
    assert report.num_samples == 24 and not report.skipped
    return out


def _source(backend, photo_tree, converted) -> str:
    """The backend's `data.path` as `byol bench` finds it: the tree, what `byol convert` wrote, or nothing."""
    record = BACKENDS[backend]
    if record.bench_path is None:
        return ""
    return record.bench_path(converted if record.writer is not None else photo_tree)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_backend_keeps_the_batch_contract(backend, photo_tree, converted):
    cfg = DataConfig(backend=backend, path=_source(backend, photo_tree, converted), image_size=SIZE, num_workers=1,
                     synthetic_size=24)
    cfg.dali.num_threads = 1
    for dtype in (torch.float32, torch.bfloat16):
        ctx = LoaderContext(device=torch.device("cpu"), dtype=dtype, batch_size=BATCH, seed=3)
        loader = build_two_view_loader(cfg, ctx)
        try:
            assert len(loader) == 24 // BATCH and loader.num_samples == 24
            loader.set_epoch(0)
            batches = list(loader)
        finally:
            loader.close()
        assert len(batches) == 3
        for b in batches:
            check_batch(b, ctx, SIZE)
            assert not torch.equal(b.view1, b.view2)            # two different views of each image
            assert torch.isfinite(b.view1.float()).all()
        if BACKENDS[backend].bench_path is None:   # no images: no labels
            assert (torch.cat([b.labels for b in batches]) == -1).all()
            continue
        index = torch.cat([b.index.cpu() for b in batches])
        labels = torch.cat([b.labels.cpu() for b in batches])
        assert sorted(index.tolist()) == list(range(24))     # the epoch covers the data once
        assert (labels == index // 8).all()                  # samples are sorted by class: 8 per class
        # normalised views: roughly zero-mean, unit-scale values, not raw [0, 255] pixels
        v = torch.cat([b.view1.float() for b in batches])
        assert -3.0 < v.mean().item() < 3.0 and v.abs().max().item() < 10


def test_classes_agree_across_backends(photo_tree, converted):
    import json

    from byolfast.pipeline.backends.dali.format import load_manifest
    manifest = load_manifest(str(converted / "dali"))
    ffcv_classes = json.loads((converted / "ffcv" / "classes.json").read_text())
    assert manifest["classes"] == ffcv_classes == ["astronaut", "chelsea", "coffee"]
    assert manifest["num_samples"] == 24 and sum(s["count"] for s in manifest["shards"]) == 24
    assert np.diff([s["count"] for s in manifest["shards"]]).tolist() == [0, -6]   # 10, 10, 4


def test_image_folder_layouts(tmp_path):
    """ImageNet's `root/train/<class>/` is found from `root`; a class that happens to be named `train` is a class."""
    from byolfast.pipeline.folder import scan_image_folder

    def touch(rel: str) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"\xff\xd8\xff")

    touch("imagenet/train/n01/a.jpg")
    touch("imagenet/train/n02/b.jpg")
    touch("imagenet/val/n01/c.jpg")
    samples, classes = scan_image_folder(tmp_path / "imagenet")
    assert classes == ["n01", "n02"] and len(samples) == 2
    touch("voc/train/a.jpg")
    touch("voc/car/b.jpg")
    samples, classes = scan_image_folder(tmp_path / "voc")
    assert classes == ["car", "train"] and len(samples) == 2


def test_rank_streams_do_not_repeat_across_seeds():
    """Run (seed 1, rank 0) must not draw what run (seed 0, rank 1) draws, as `seed + rank` streams did."""
    from byolfast.pipeline.backends.ffcv.decode import view_seed
    from byolfast.pipeline.sharding import rank_seed

    assert len({rank_seed(s, r) for s in range(8) for r in range(8)}) == 64
    assert view_seed(1, 0, 0, 0) != view_seed(0, 1, 0, 0)
    cfg = DataConfig(backend="synthetic", image_size=SIZE, synthetic_size=32)
    first = []
    for seed, rank in ((1, 0), (0, 1)):
        loader = build_two_view_loader(cfg, LoaderContext(batch_size=BATCH, rank=rank, world_size=2, seed=seed))
        loader.set_epoch(0)
        first.append(next(iter(loader)).view1)
        loader.close()
    assert not torch.equal(*first)
