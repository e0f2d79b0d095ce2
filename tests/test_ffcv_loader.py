"""The FFCV backend on a tiny beton of real photographs: contract, views, labels, sharding, seeded crops, bad files.

The beton stores its samples shuffled, as `byol convert` writes it: the loader must report global indices (the
`index` field) and seed the crops from them, whatever the storage order.

FFCV's numba code compiles on a loader's first epoch (15-30 s here), so one loader is built per module and shared;
tests that change its state (epoch, device_augment, ctx) put it back. The crop check replays the loader's own draws
(`crop_flip_params`) on the stored JPEGs and compares with PIL's antialiased bicubic resize (torchvision's
`resized_crop`): the only difference left is the JPEG decoder (FFCV uses libjpeg-turbo's fast DCT), about 1 grey
level on average.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torchvision.transforms import RandomResizedCrop

pytest.importorskip("ffcv")

from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.pipeline.graph import DecoderNode  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.writer import DatasetWriter  # noqa: E402

from byolfast.pipeline.backends.ffcv import format as ffcv_format  # noqa: E402
from byolfast.pipeline.config import DataConfig  # noqa: E402
from byolfast.pipeline.contract import DataError, LoaderContext, check_batch  # noqa: E402
from byolfast.pipeline.storage import shard_order  # noqa: E402
from byolfast.pipeline.backends.ffcv.decode import crop_flip_params, view_seed  # noqa: E402
from byolfast.pipeline.backends.ffcv.loader import FfcvTwoViewLoader  # noqa: E402
from byolfast.pipeline.sharding import num_batches, rank_indices  # noqa: E402

NUM_IMAGES = 48
MAX_SIDE = 64
SIZE = 32
BATCH = 8
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
CLASSES = ["astronaut", "chelsea", "coffee", "rocket", "camera"]
logger = logging.getLogger(__name__)


def _photos(n: int, max_side: int) -> list[np.ndarray]:
    """Random crops of five real photographs, resized so their longer side is `max_side`; label = k % 5."""
    srcs = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), np.stack([data.camera()] * 3, -1)]
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        a = srcs[k % len(srcs)]
        h, w = a.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        im = Image.fromarray(a[y:y + ch, x:x + cw])
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))), Image.Resampling.BICUBIC)
        out.append(np.asarray(im.convert("RGB")))
    return out


class _Photos:
    """Position p holds sample `order[p]`: its image, its label (index % 5) and its global index."""

    def __init__(self, images: list[np.ndarray], order: np.ndarray):
        self.images = images
        self.order = order

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, p: int) -> tuple[np.ndarray, int, int]:
        i = int(self.order[p])
        return self.images[i], i % len(CLASSES), i


def write_beton(path: Path, images: list[np.ndarray], order: np.ndarray | None = None) -> Path:
    """A beton with the fields of `byol convert`: image (JPEG), label, index; stored in `order` (default: by index)."""
    order = np.arange(len(images)) if order is None else order
    fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=90), "label": IntField(), "index": IntField()}
    DatasetWriter(str(path), fields, num_workers=1, page_size=1 << 21).from_indexed_dataset(_Photos(images, order))
    return path


@pytest.fixture(scope="module")
def beton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ffcv") / "data"
    (root / "ffcv").mkdir(parents=True)
    path = write_beton(root / "ffcv" / "train.beton", _photos(NUM_IMAGES, MAX_SIDE), shard_order(NUM_IMAGES))
    (root / "ffcv" / "classes.json").write_text(json.dumps(CLASSES))
    return path


@pytest.fixture(scope="module")
def ctx() -> LoaderContext:
    return LoaderContext(batch_size=BATCH, seed=7)


@pytest.fixture(scope="module")
def loader(beton: Path, ctx: LoaderContext):
    # data.path as the folder above ffcv/train.beton, as `byol convert` lays it out
    cfg = DataConfig(backend="ffcv", path=str(beton.parent.parent), image_size=SIZE, num_workers=2)
    ld = FfcvTwoViewLoader(cfg, ctx)
    yield ld
    ld.close()
    # FFCV's loader is a reference cycle: free it (and numba's dispatchers in it) here rather than at a random later
    # collection. A dispatcher's finalizer raises an ignored KeyError; under pytest on Python 3.11, its report made
    # inside an interrupted `ast.parse` (an import) fails that parse with "AST constructor recursion depth mismatch".
    del ld
    gc.collect()


@pytest.fixture(scope="module")
def epoch0(loader: FfcvTwoViewLoader) -> list:
    """All batches of epoch 0 (the first iteration compiles FFCV's pipeline)."""
    loader.set_epoch(0)
    return list(loader)


def _stored_images(beton: Path) -> dict[int, np.ndarray]:
    """Decode the stored JPEGs with OpenCV, by global index (the `index` field)."""
    reader = Reader(str(beton))
    meta = reader.metadata["f0"]
    raw = np.fromfile(beton, dtype=np.uint8)
    size_of = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    out = {}
    for ptr, index in zip(meta["data_ptr"].tolist(), reader.metadata["f2"].tolist()):
        bgr = cv2.imdecode(raw[ptr:ptr + size_of[ptr]], cv2.IMREAD_COLOR)
        out[index] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return out


def test_contract_and_labels(loader: FfcvTwoViewLoader, beton: Path, epoch0: list, ctx: LoaderContext) -> None:
    assert Reader(str(beton)).metadata["f2"].tolist() == shard_order(NUM_IMAGES).tolist()  # stored shuffled
    assert len(loader) == NUM_IMAGES // BATCH == len(epoch0)
    assert loader.classes == CLASSES
    for b in epoch0:
        check_batch(b, ctx, SIZE)
        assert torch.equal(b.labels, b.index % len(CLASSES))  # the writer's label of sample i is i % 5
    index = torch.cat([b.index for b in epoch0])
    assert torch.equal(index, torch.from_numpy(loader.epoch_order(0)))  # the shared permutation, in order
    assert np.array_equal(loader.epoch_order(0), rank_indices(NUM_IMAGES, BATCH, 0, 1, ctx.seed, 0))
    assert sorted(index.tolist()) == list(range(NUM_IMAGES))
    assert loader.stats()["samples"] == NUM_IMAGES and loader.stats()["stored_max_side"] == MAX_SIDE


def test_views_differ_and_are_normalised(epoch0: list) -> None:
    v1 = torch.cat([b.view1 for b in epoch0])
    v2 = torch.cat([b.view2 for b in epoch0])
    assert torch.isfinite(v1).all() and torch.isfinite(v2).all()
    per_sample_diff = (v1 - v2).abs().flatten(1).mean(1)
    assert (per_sample_diff > 0.05).all()
    assert -0.6 < v1.mean().item() < 0.6 and 0.5 < v1.std().item() < 1.6  # ImageNet-normalised photos


def test_epochs_reproducible_resumable_and_different(loader: FfcvTwoViewLoader, epoch0: list) -> None:
    loader.set_epoch(0, start_batch=2)  # mid-epoch resume replays the rest of epoch 0 exactly
    resumed = list(loader)
    assert len(resumed) == len(epoch0) - 2
    for a, b in zip(epoch0[2:], resumed):
        assert torch.equal(a.index, b.index)
        assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2)
    loader.set_epoch(1)
    epoch1 = list(loader)
    loader.set_epoch(0)
    by_index0 = {i: v for b in epoch0 for i, v in zip(b.index.tolist(), b.view1)}
    by_index1 = {i: v for b in epoch1 for i, v in zip(b.index.tolist(), b.view1)}
    assert not torch.equal(torch.cat([b.index for b in epoch0]), torch.cat([b.index for b in epoch1]))
    assert all(not torch.equal(by_index0[i], by_index1[i]) for i in by_index0)  # new views each epoch


def test_a_superseded_epoch_ends_cleanly(loader: FfcvTwoViewLoader) -> None:
    loader.set_epoch(0)
    stale = iter(loader)
    next(stale)
    loader.set_epoch(1)
    fresh = iter(loader)
    next(fresh)  # starting an epoch stops the one in flight
    assert list(stale) == []  # the stale generator ends instead of waiting forever on its queue ...
    assert len(list(fresh)) == len(loader) - 1  # ... and its end does not stop the fresh epoch
    loader.set_epoch(0)


def test_close_mid_epoch_returns_whatever_is_left(loader: FfcvTwoViewLoader) -> None:
    """Stopping an epoch early (preemption, max_steps) must not hang, however many batches the epoch thread has
    left to hand over: with exactly `batches_ahead` left it used to block on a full queue for ever."""
    for left in range(0, min(len(loader), loader.cfg.ffcv.batches_ahead + 3)):
        loader.set_epoch(0)
        it = iter(loader)
        for _ in range(len(loader) - left):
            next(it)
        time.sleep(0.3)   # let the epoch thread fill the queue and block on it
        closer = threading.Thread(target=loader.close, daemon=True)
        closer.start()
        closer.join(timeout=30)
        assert not closer.is_alive(), f"close() hung with {left} batch(es) left"
        assert list(it) == []
    loader.set_epoch(0)


def test_an_error_in_the_epoch_thread_reaches_the_consumer(loader: FfcvTwoViewLoader, monkeypatch) -> None:
    """FFCV's epoch thread caught only StopIteration: any other error there (a device copy out of memory, a read
    error) ended the thread and the consumer waited on the queue for ever."""
    from ffcv.loader.epoch_iterator import EpochIterator
    run_pipeline = EpochIterator.run_pipeline   # FFCV's own, below the seeded iterator's

    def failing(self, b_ix, *args):
        if b_ix == 1:
            raise MemoryError("no room for batch 1") from OSError("the cause")
        return run_pipeline(self, b_ix, *args)

    monkeypatch.setattr(EpochIterator, "run_pipeline", failing)
    got: dict = {}

    def consume() -> None:
        loader.set_epoch(0)
        it = iter(loader)
        got["first"] = next(it)
        try:
            next(it)
        except MemoryError as e:
            got["error"] = e

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(timeout=180)   # run alone, the first epoch also compiles FFCV's pipeline (15-30 s, more on CI)
    assert not consumer.is_alive(), "the consumer waits for ever after the epoch thread failed"
    assert "first" in got and str(got["error"]) == "no room for batch 1"
    assert "epoch 0, batch 1" in " ".join(got["error"].__notes__) and str(got["error"].__cause__) == "the cause"
    monkeypatch.undo()
    loader.set_epoch(0)
    assert len(list(loader)) == len(loader)   # the next epoch runs as usual


def test_crops_replay_the_seeded_draws(loader: FfcvTwoViewLoader, beton: Path, ctx: LoaderContext) -> None:
    """Crop + flip only (device_augment off): each view equals PIL's antialiased bicubic resize of the crop
    `crop_flip_params` draws."""
    aug = loader.cfg.augment
    mean = torch.tensor(aug.mean).view(1, 3, 1, 1)
    std = torch.tensor(aug.std).view(1, 3, 1, 1)
    images = _stored_images(beton)
    loader.device_augment = False
    try:
        loader.set_epoch(3)
        batches = list(loader)
    finally:
        loader.device_augment = True
    errors, wrong_flip_errors = [], []
    for b in batches:
        for v, (view, spec) in enumerate(((b.view1, aug.view1), (b.view2, aug.view2))):
            got = ((view * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            seed = view_seed(ctx.seed, ctx.rank, 3, v)
            for k, idx in enumerate(b.index.tolist()):
                img = images[idx]
                i, j, h, w, flip = crop_flip_params(seed, idx, img.shape[0], img.shape[1], np.array(spec.crop_scale),
                                                    np.array(spec.crop_ratio), spec.flip_p)
                want = np.asarray(Image.fromarray(np.ascontiguousarray(img[i:i + h, j:j + w]))
                                  .resize((SIZE, SIZE), Image.Resampling.BICUBIC))
                unflipped = want
                if flip:
                    want, unflipped = want[:, ::-1], want
                else:
                    unflipped = want[:, ::-1]
                errors.append(np.abs(want.astype(int) - got[k].astype(int)).mean())
                wrong_flip_errors.append(np.abs(unflipped.astype(int) - got[k].astype(int)).mean())
    assert max(errors) < 2.0, f"crop replay error {max(errors):.2f} grey levels"   # measured 1.2
    assert np.mean(errors) < 1.2   # measured 0.98: the fast DCT
    assert np.mean(wrong_flip_errors) > 10 * np.mean(errors)


def test_one_decode_feeds_both_views_and_buffers_outlive_the_epoch(loader: FfcvTwoViewLoader) -> None:
    """Both views come from one decoder node of the `image` field (one JPEG decode per sample), and the next epoch
    reuses the pipeline's buffers (FFCV would allocate them, the decoder's scratch included, every epoch)."""
    graph = loader._loader.graph
    assert [n.field_name for n in graph.nodes if isinstance(n, DecoderNode)].count("image") == 1
    buffers = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        it = iter(loader)
        next(it)
        buffers.append(loader._iterator.memory_allocations)
        loader.close()
    assert buffers[0] is buffers[1]
    loader.set_epoch(0)


def test_crop_and_flip_draws_follow_torchvision() -> None:
    """The draws over many samples: torchvision's RandomResizedCrop distribution (quantiles of area and aspect, on a
    4:3 image where large crops are often rejected and redrawn), a fair flip, fixed per seed, new per epoch."""
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    height, width, n = 240, 320, 4000
    seed0 = view_seed(0, 0, 0, 0)
    draws = np.array([crop_flip_params(seed0, i, height, width, np.array(scale), np.array(ratio), 0.5)
                      for i in range(n)], dtype=np.float64)
    torch.manual_seed(0)
    image = torch.empty(3, height, width)
    ref = np.array([RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(n)], dtype=np.float64)
    for got, want in ((draws[:, 2:4], ref[:, 2:4]),):
        area_q = np.quantile(got.prod(1), QUANTILES) / (height * width)
        area_ref = np.quantile(want.prod(1), QUANTILES) / (height * width)
        assert np.abs(area_q - area_ref).max() < 0.04, (area_q, area_ref)
        aspect_q = np.quantile(np.log(got[:, 1] / got[:, 0]), QUANTILES)
        aspect_ref = np.quantile(np.log(want[:, 1] / want[:, 0]), QUANTILES)
        assert np.abs(aspect_q - aspect_ref).max() < 0.04, (aspect_q, aspect_ref)
    assert draws[:, 2:4].prod(1).min() >= 0.075 * height * width
    flip = draws[:, 4]
    assert abs(flip.mean() - 0.5) < 4 * 0.5 / np.sqrt(n)
    again = crop_flip_params(seed0, 17, height, width, np.array(scale), np.array(ratio), 0.5)
    assert list(again) == [*draws[17, :4].astype(int).tolist(), bool(draws[17, 4])]
    next_epoch = np.array([crop_flip_params(view_seed(0, 0, 1, 0), i, height, width, np.array(scale), np.array(ratio),
                                            0.5)[:4] for i in range(100)])
    assert (next_epoch != draws[:100, :4]).any(axis=1).mean() > 0.95


def test_two_emulated_ranks_are_disjoint_and_cover_the_kept_samples(loader: FfcvTwoViewLoader,
                                                                    ctx: LoaderContext) -> None:
    """Rank and world size come from ctx at each epoch: swap ctx to play both ranks of a 2-process job."""
    world = 2
    seen = []
    try:
        for rank in range(world):
            loader.ctx = dataclasses.replace(ctx, rank=rank, world_size=world)
            loader.set_epoch(5)
            batches = list(loader)
            assert len(batches) == len(loader) == num_batches(NUM_IMAGES, BATCH, world)
            seen.append(torch.cat([b.index for b in batches]).tolist())
    finally:
        loader.ctx = ctx
    kept = num_batches(NUM_IMAGES, BATCH, world) * BATCH * world
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == kept


def test_quasi_random_order_depends_on_the_epoch_only(beton: Path, ctx: LoaderContext) -> None:
    # FFCV shuffles its page table in place: without restoring it, a resumed run (a fresh loader) would visit
    # another order than the run it continues.
    cfg = DataConfig(backend="ffcv", path=str(beton.parent.parent), image_size=SIZE, num_workers=1)
    cfg.ffcv.order = "quasi_random"
    running, fresh = FfcvTwoViewLoader(cfg, ctx), FfcvTwoViewLoader(cfg, ctx)
    try:
        first = running.epoch_order(0)
        assert np.array_equal(first, running.epoch_order(0))
        assert np.array_equal(running.epoch_order(1), fresh.epoch_order(1))
        assert not np.array_equal(first, running.epoch_order(1))
    finally:
        running.close()
        fresh.close()


def _classes_per_batch(labels: np.ndarray) -> float:
    return float(np.mean([len(set(b)) for b in labels.reshape(-1, BATCH).tolist()]))


def test_quasi_random_batches_mix_classes(tmp_path: Path, ctx: LoaderContext, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """FFCV's quasi-random order draws a batch from a window of 2 x batch-size pages. A beton of `byol convert`
    stores the samples shuffled, so its batches hold about as many classes as uniform ones; the same pages in class
    order (as convert wrote them before) give fewer, and the loader says so."""
    num_classes, per_class, side = 30, 8, 280   # raw 280 px images: 8 to a 2 MiB page, 30 pages, a window of 16
    n = num_classes * per_class
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(data.astronaut()).resize((side, side)).save(jpeg, quality=90)
    refs = [(str(jpeg), 0, jpeg.stat().st_size, i // per_class) for i in range(n)]

    def classes_per_batch(folder: Path) -> tuple[float, np.ndarray]:
        ffcv_format.write_beton(folder, refs, [str(c) for c in range(num_classes)], max_side=0, jpeg_quality=90,
                                write_mode="raw", workers=1, max_image_bytes=side * side * 3,
                                total_bytes=n * side * side * 3, settings={}, progress=False)
        reader = Reader(str(folder / "train.beton"))
        assert len(np.unique(reader.alloc_table["ptr"] >> 21)) == n // 8   # 8 samples to a page
        stored = reader.metadata["f2"]
        assert reader.metadata["f1"].tolist() == (stored // per_class).tolist()   # each label with its index
        cfg = DataConfig(backend="ffcv", path=str(folder), image_size=SIZE, num_workers=1)
        cfg.ffcv.order = "quasi_random"
        ld = FfcvTwoViewLoader(cfg, ctx)
        try:
            orders = [ld.epoch_order(e) for e in range(20)]
        finally:
            ld.close()
        for order in orders:
            assert sorted(order.tolist()) == list(range(n))   # global indices, each once
        return _classes_per_batch(np.concatenate(orders) // per_class), stored

    with caplog.at_level(logging.WARNING, logger="byolfast.pipeline.backends.ffcv.loader"):
        shuffled, stored = classes_per_batch(tmp_path / "shuffled")
    assert stored.tolist() == shard_order(n).tolist() and "class order" not in caplog.text
    monkeypatch.setattr(ffcv_format, "shard_order", np.arange)   # the layout of an earlier convert
    with caplog.at_level(logging.WARNING, logger="byolfast.pipeline.backends.ffcv.loader"):
        class_ordered, stored = classes_per_batch(tmp_path / "class_ordered")
    assert stored.tolist() == list(range(n)) and "class order" in caplog.text
    uniform = num_classes * (1 - (1 - 1 / num_classes) ** BATCH)   # expected classes in a uniform batch: 7.13
    logger.info("classes per batch of %d: %.2f shuffled, %.2f class-ordered, %.2f uniform", BATCH, shuffled,
                class_ordered, uniform)
    assert abs(shuffled - uniform) < 0.3
    assert shuffled > class_ordered + 0.5


@pytest.mark.parametrize("damage", ["missing", "folder", "empty", "not_beton", "truncated", "unfinished",
                                    "classes_json"])
def test_bad_files_raise_data_error(beton: Path, tmp_path: Path, damage: str) -> None:
    bad = tmp_path / "x.beton"
    raw = beton.read_bytes()
    if damage == "classes_json":   # a sound beton beside a class list cut short
        bad.write_bytes(raw)
        (tmp_path / "classes.json").write_text('["a", "b"')
    elif damage == "folder":
        bad = tmp_path
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "not_beton":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64)
    elif damage == "truncated":
        bad.write_bytes(raw[:len(raw) // 2])
    elif damage == "unfinished":
        bad.write_bytes(raw[:16] + b"\0" * 8 + raw[24:])  # the allocation-table pointer is written last
    with pytest.raises(DataError, match="byol convert"):
        FfcvTwoViewLoader(DataConfig(backend="ffcv", path=str(bad), image_size=SIZE), LoaderContext(batch_size=BATCH))


def test_labels_beyond_classes_json_and_tiny_dataset(beton: Path, tmp_path: Path) -> None:
    copy = tmp_path / "train.beton"
    copy.write_bytes(beton.read_bytes())
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES[:3]))
    with pytest.raises(DataError, match="classes"):
        FfcvTwoViewLoader(DataConfig(backend="ffcv", path=str(tmp_path), image_size=SIZE),
                          LoaderContext(batch_size=BATCH))
    (tmp_path / "classes.json").unlink()
    with pytest.raises(DataError, match="fewer than one global batch"):
        FfcvTwoViewLoader(DataConfig(backend="ffcv", path=str(copy), image_size=SIZE),
                          LoaderContext(batch_size=32, world_size=2))


def test_an_index_field_that_is_not_a_permutation_is_refused(tmp_path: Path) -> None:
    bad = write_beton(tmp_path / "bad.beton", _photos(BATCH, MAX_SIDE), np.array([0, 1, 2, 3, 4, 5, 6, 6]))
    with pytest.raises(DataError, match=r"field `index` does not hold each of 0..7 once.*byol convert"):
        FfcvTwoViewLoader(DataConfig(backend="ffcv", path=str(bad), image_size=SIZE), LoaderContext(batch_size=BATCH))


def test_image_size_above_every_stored_side_is_refused(beton: Path) -> None:
    cfg = DataConfig(backend="ffcv", path=str(beton), image_size=MAX_SIDE + 1)
    cfg.augment.color_ops = "torchvision"
    with pytest.raises(DataError, match=rf"data.image_size={MAX_SIDE + 1} .* \(largest side {MAX_SIDE} px\).* at most "
                                        rf"{MAX_SIDE}.*--max-side"):
        FfcvTwoViewLoader(cfg, LoaderContext(batch_size=BATCH))
    ld = FfcvTwoViewLoader(dataclasses.replace(cfg, image_size=MAX_SIDE), LoaderContext(batch_size=BATCH))
    assert [a.color_ops for a in ld._augment] == ["torchvision", "torchvision"]   # the device augmentation's maths
    ld.close()


def test_upsampling_warns_and_torch_threads_are_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mixed = write_beton(tmp_path / "mixed.beton", _photos(4, MAX_SIDE) + _photos(4, MAX_SIDE // 2))
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # FFCV would set torch's thread count to its worker count (2)
    try:
        with caplog.at_level(logging.WARNING, logger="byolfast.pipeline.backends.ffcv.loader"):
            ld = FfcvTwoViewLoader(DataConfig(backend="ffcv", path=str(mixed), image_size=MAX_SIDE - 8,
                                              num_workers=2), LoaderContext(batch_size=BATCH))
            ld.close()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert "upsampled" in caplog.text and "4 of 8" in caplog.text
