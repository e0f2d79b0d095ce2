"""FFCV's CUDA path (`ToDevice` to the GPU, the colour augmentation there) against its CPU path, on a tiny beton.

The crops and flips are drawn and cut on the CPU in both paths (FFCV's numba decoder, seeded per sample), so on the
GPU they must arrive unchanged: batches without the colour augmentation (`device_augment=False`: crop, flip,
normalise) agree with the CPU path's to float rounding (atol 1e-5 on normalised pixels). The colour augmentation draws
its parameters on the batch's device, from a generator the loader re-seeds per batch from (seed, rank, epoch, batch);
CUDA's generator does not give the CPU's numbers, so the check replays the loader: the parameters a CUDA generator
seeded as the loader seeds it draws, moved to the CPU, applied by the CPU reference (`BatchedViewAugment.apply`) to
the CPU path's crops, must give the CUDA batch within atol 1e-4 on normalised pixels, the tolerance of
`test_forward_on_cuda_has_no_host_sync_and_matches_cpu`. Per-sample values, not constants: every draw (the jitter
coin, its order, the four factors, grayscale, blur and its sigma, solarize) varies across the batch.

On the CPU (in CI) the same replay with a CPU generator must give the CPU loader's own augmented batches: that checks
the replay itself (and the crops' exact recovery from normalised views), so a GPU failure is about the GPU.
FFCV compiles its pipeline on a loader's first epoch (15-30 s here): one CPU loader is shared by both tests.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("ffcv")

from byolfast.pipeline.config import AugmentConfig, DataConfig  # noqa: E402
from byolfast.pipeline.contract import LoaderContext  # noqa: E402
from byolfast.pipeline.device_augment import BatchedViewAugment  # noqa: E402
from byolfast.pipeline.backends.ffcv.loader import FfcvTwoViewLoader  # noqa: E402
from byolfast.pipeline.sharding import mix_seed, rank_seed  # noqa: E402

SIZE = 32
BATCH = 8
IMAGES = 24
SEED = 5


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """24 photo crops (64x48 and 48x64) converted by `byol convert` into `ffcv/train.beton`."""
    from byolfast.benchmarks.bench_data import build_bench_images
    from byolfast.pipeline.convert import convert_dataset

    root = tmp_path_factory.mktemp("ffcv_cuda")
    folder = build_bench_images(root, IMAGES, size=(64, 48))
    convert_dataset(str(folder), str(root / "converted"), ("ffcv",), workers=1, max_side=64, progress=False)
    return root / "converted"


def make_loader(path: Path, device: str, augment_stream: bool = False) -> FfcvTwoViewLoader:
    ctx = LoaderContext(device=torch.device(device), dtype=torch.float32, batch_size=BATCH, seed=SEED)
    cfg = DataConfig(backend="ffcv", path=str(path), image_size=SIZE, num_workers=2)
    cfg.ffcv.augment_stream = augment_stream
    return FfcvTwoViewLoader(cfg, ctx)


@pytest.fixture(scope="module")
def cpu_loader(converted):
    loader = make_loader(converted, "cpu")
    yield loader
    loader.close()


def epoch(loader: FfcvTwoViewLoader, device_augment: bool) -> list[tuple[torch.Tensor, ...]]:
    """Epoch 0, each batch as (view1, view2, labels, index) on the CPU."""
    loader.device_augment = device_augment
    try:
        loader.set_epoch(0)
        return [tuple(t.cpu().clone() for t in (b.view1, b.view2, b.labels, b.index)) for b in loader]
    finally:
        loader.device_augment = True


def crops_of(view: torch.Tensor) -> torch.Tensor:
    """The uint8 crops behind a normalised float32 view (no colour augmentation): exact, each value lies within 1e-3
    of an integer."""
    aug = AugmentConfig()
    mean = torch.tensor(aug.mean).view(1, 3, 1, 1)
    std = torch.tensor(aug.std).view(1, 3, 1, 1)
    x = (view.double() * std + mean) * 255
    assert (x - x.round()).abs().max() < 1e-3, "not a crop: the view holds a colour augmentation"
    return x.round().clamp(0, 255).to(torch.uint8).contiguous()


def replay(crops: list[tuple[torch.Tensor, torch.Tensor]], ctx: LoaderContext, device: str) -> list[tuple]:
    """The loader's colour augmentation of each batch of (view1, view2) crops, its draws made on `device` as the loader
    makes them (one generator re-seeded per batch, view 1's draws then view 2's), applied on the CPU by the reference
    `apply`; also the draws, per batch and view."""
    aug = AugmentConfig()
    refs = [BatchedViewAugment(spec, aug.mean, aug.std, SIZE, color_ops=aug.color_ops)   # as the loader builds them
            for spec in (aug.view1, aug.view2)]
    gen = torch.Generator(device=device)
    out = []
    for b, pair in enumerate(crops):
        gen.manual_seed(mix_seed(rank_seed(ctx.seed, ctx.rank), 0, b, 2))   # as FfcvTwoViewLoader._to_batch
        views, params = [], []
        for ref, c in zip(refs, pair):
            p = {k: v.cpu() for k, v in ref.sample_params(c.shape[0], device, gen).items()}
            views.append(ref.apply(ref.to_float01(c), p))
            params.append(p)
        out.append((*views, params))
    return out


def assert_replayed(augmented: list[tuple], plain: list[tuple], ctx: LoaderContext, device: str, atol: float) -> None:
    crops = [(crops_of(v1), crops_of(v2)) for v1, v2, *_ in plain]
    expected = replay(crops, ctx, device)
    worst = 0.0
    for (a1, a2, labels, index), (p1, p2, plabels, pindex), (r1, r2, params) in zip(augmented, plain, expected):
        assert torch.equal(index, pindex) and torch.equal(labels, plabels)
        for got, ref in ((a1, r1), (a2, r2)):
            worst = max(worst, (got - ref).abs().max().item())
            torch.testing.assert_close(got, ref, atol=atol, rtol=0)
    draws = {k: torch.cat([view[k] for *_, p in expected for view in p]).float() for k in ("jitter", "contrast", "hue")}
    assert 0 < draws["jitter"].mean() < 1 and draws["contrast"].std() > 0.1 and draws["hue"].std() > 0.02, draws
    print(f"{device}: augmented views within {worst:.2e} of the replay (normalised pixels)")


def test_replay_gives_the_cpu_loaders_own_batches(cpu_loader):
    """The CPU side of the CUDA comparison, and a check of the replay."""
    assert cpu_loader._side is None and not cpu_loader.cfg.ffcv.augment_stream, "no side stream off CUDA, off by default"
    plain, augmented = epoch(cpu_loader, False), epoch(cpu_loader, True)
    assert len(plain) == len(augmented) == IMAGES // BATCH
    # on the CPU the loader runs the per-pixel kernels (`apply_cpu`), the replay `apply`: equal within 2e-6 on [0, 1]
    assert_replayed(augmented, plain, cpu_loader.ctx, "cpu", atol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_cpu_path(converted, cpu_loader):
    cuda = make_loader(converted, "cuda")
    try:
        cuda_plain = epoch(cuda, False)
        cuda_augmented = epoch(cuda, True)
        batch = next(iter(cuda))
        assert batch.view1.is_cuda and batch.view1.is_contiguous(memory_format=torch.channels_last)
    finally:
        cuda.close()
    cpu_plain = epoch(cpu_loader, False)
    assert len(cuda_plain) == len(cpu_plain) == IMAGES // BATCH
    worst = 0.0
    for got, ref in zip(cuda_plain, cpu_plain):
        for g, r in zip(got, ref):
            if g.is_floating_point():
                worst = max(worst, (g - r).abs().max().item())
            torch.testing.assert_close(g, r, atol=1e-5, rtol=0)
    print(f"crops through ToDevice: within {worst:.2e} of the CPU path")
    assert_replayed(cuda_augmented, cpu_plain, cuda.ctx, "cuda", atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_side_stream_gives_the_same_batches(converted):
    """`data.ffcv.augment_stream`: FFCV's copies and the augmentation on a stream of their own, handed to the training
    stream by an event, give the batches of the default path exactly (the same draws, the same kernels). The training
    stream is kept busy behind each batch (`torch.cuda._sleep`) and nothing syncs until the epoch's end, so the side
    stream runs ahead while earlier batches are still being read; the augmentation is switched off for one batch
    mid-epoch (that batch is read on the side stream too)."""
    batches = {}
    for on in (False, True):
        loader = make_loader(converted, "cuda", augment_stream=on)
        try:
            assert (loader._side is not None) == on
            loader.set_epoch(0)
            kept = []
            for b, batch in enumerate(loader):
                torch.cuda._sleep(2_000_000)   # the consumer lags (~1 ms of spinning on the training stream)
                kept.append([batch.view1.clone(), batch.view2.clone()])   # device copies, on the training stream
                loader.device_augment = b != 0   # batch 1 without the augmentation
            torch.cuda.synchronize()
            batches[on] = [[t.cpu() for t in pair] for pair in kept]
        finally:
            loader.device_augment = True
            loader.close()
    assert len(batches[True]) == len(batches[False]) == IMAGES // BATCH
    for got, ref in zip(batches[True], batches[False]):
        for g, r in zip(got, ref):
            assert torch.equal(g, r)
