"""DALI's GPU ops checked for values against the same per-sample draws on the CPU.

Every random parameter of the DALI augmentation is a per-sample value drawn on the CPU and handed to a GPU op (an
argument input, or a regular input copied to the device: see `test_dali_gpu_graph.py`). These tests feed those
values, sample by sample, and compare the GPU's pixels with the CPU's:
  - `per_sample_ops`: each op with a per-sample draw, applied in one pipeline to CPU images and to the same images
    on the GPU, so that both get the very same draw nodes: the default maths (`color_ops=deepmind`: brightness delta,
    per-channel contrast with its per-image means, HSV saturation), torchvision's (brightness factor, contrast with its
    grey mean, saturation), the exact hue, `fn.hsv`'s hue, the blur's sigma and window, the flip inside the
    normalisation, the crop window of the resize. On the CPU (in CI) each sample is also checked against torchvision's
    op, or `pipeline.device_augment`'s for the default maths, with its own draw (all but `fn.hsv`'s hue, which has no
    twin), which checks that the draws are read back and applied sample by sample.
  - `twin_views`: the loader's graph (`dali_loader.two_view_pipeline`: `crop_window`, `resize_window`, `augment_view`
    for both views, the debug draws) on CPU-decoded images, built twice with one seed: on the CPU, and with the decoded
    images moved to the GPU. DALI seeds its random operators in the order they are added, and the two graphs hold the
    same operators in the same order as the loader's own (checked on the CPU below), so they draw the same values:
    the draws must be equal, the views close.
  - the loader itself (`DaliTwoViewLoader`, `debug_params`): the `mixed` decoder (nvJPEG) on the GPU against the CPU
    decoder with the CPU graph ops (`cpu_kernels=False`, the GPU's twin), one seed: the same draws, and views close up
    to the two JPEG decoders' difference.
Tolerances, in grey levels (views are compared after undoing their normalisation):
  - one op: max 1, mean < 0.05: the same float maths on both devices rounded to uint8, where a value within float
    error of .5 may round either way (`test_augment_ops_on_gpu_match_cpu` holds the fixed-factor ops to the same);
    the crop's antialiased resize: max 2, mean < 0.1 (its weights may be summed in another order).
  - a whole view: each sample's mean < 1.5, the 99.9th percentile <= 6, the max <= 12. Each op rounds to uint8, so a
    one-level difference early in the chain can grow through contrast (up to 1.4x), saturation and blur, and the
    exact hue and solarisation are steep on some pixels. `test_twin_tolerance_covers_one_level_of_noise` measures that
    on the CPU, giving one twin's crops a deterministic +-1 level on two pixels in three (harsher than rounding):
    worst sample mean 0.71, 99.9th percentile 3, max 5 (the default maths); the bounds are twice that. A wrong
    per-sample factor moves its sample's mean by more: on these photographs a contrast of 0.8 instead of 1.2 by 3-25
    grey levels, a brightness delta of 0.1 by 21-26, a hue shift of 0.1 by 6-31 on the colour ones (grey images have
    no hue to shift).
  - the loader (`mixed` vs CPU decoding): each sample's mean < 4 grey levels: nvJPEG and libjpeg-turbo decode the same
    JPEG a little differently (chroma upsampling, the IDCT), by about a grey level on average before the augmentation.
No GPU has run these yet: each GPU test prints what it measured (the suite keeps that output with `-rA`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali import math as dmath  # noqa: E402
from nvidia.dali.tensors import TensorListGPU  # noqa: E402

from byolfast.pipeline import dali_augment as A  # noqa: E402
from byolfast.pipeline.config import AugmentConfig, DaliConfig, DataConfig, ViewSpec  # noqa: E402
from byolfast.pipeline.contract import LoaderContext  # noqa: E402
from byolfast.pipeline.backends.dali.loader import DEBUG_DRAWS, DaliTwoViewLoader, two_view_pipeline  # noqa: E402

SIZE = 32
BATCH = 8
SEED = 3
OPS = ("brightness", "contrast", "saturation", "hue", "hsv_hue", "blur", "flip", "crop", "brightness_shift",
       "channel_contrast", "hsv_saturation")
TWIN_MEAN, TWIN_P999, TWIN_MAX = 1.5, 6.0, 12.0
LOADER_MEAN = 4.0
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[str]:
    """8 JPEGs of photo crops, 88x64 and 64x88, two of them small (crops then upscale)."""
    from PIL import Image

    from byolfast.benchmarks.bench_data import build_bench_images

    folder = build_bench_images(tmp_path_factory.mktemp("dali_values"), BATCH, size=(88, 64))
    paths = sorted(folder.glob("*/*.jpg"))
    for p in paths[::4]:
        Image.open(p).resize((40, 30), Image.Resampling.BICUBIC).save(p, quality=90)
    return [str(p) for p in paths]


def run(graph: Callable[[], dict], gpu: bool, seed: int = SEED) -> dict[str, list[np.ndarray]]:
    """Build the pipeline whose outputs `graph` returns by name, run one batch; per name, the samples as arrays."""
    names: list[str] = []

    @pipeline_def(enable_conditionals=True)
    def pipe_def():
        nodes = graph()
        names.extend(nodes)
        return tuple(nodes.values())

    pipe = pipe_def(batch_size=BATCH, num_threads=2, device_id=0 if gpu else None, seed=seed)
    pipe.build()
    out = pipe.run()
    return {name: [np.array(t[i]) for i in range(BATCH)]
            for name, t in zip(names, (o.as_cpu() if isinstance(o, TensorListGPU) else o for o in out))}


def ops_graph(files: list[str], gpu: bool) -> Callable[[], dict]:
    """Every op with a per-sample draw, on the CPU images (`cpu/<op>`) and, with `gpu`, on the same images on the GPU
    (`gpu/<op>`), from one set of draws (`draw/<name>`); `image` is the input, `full` the uncropped decode."""
    def graph() -> dict:
        jpegs, _ = fn.readers.file(files=files, name="Reader")
        full = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        img = fn.resize(full, size=[SIZE, SIZE])
        d = {"b": fn.random.uniform(range=[0.6, 1.4]), "c": fn.random.uniform(range=[0.6, 1.4]),
             "s": fn.random.uniform(range=[0.8, 1.2]), "h": fn.random.uniform(range=[-0.1, 0.1]),
             "sigma": fn.random.uniform(range=[0.1, 2.0]),
             "mirror": fn.random.coin_flip(probability=0.5, dtype=types.INT32)}
        d["anchor"], d["shape"] = A.crop_window(fn.peek_image_shape(jpegs), ViewSpec())
        d["delta"] = fn.random.uniform(range=[-0.4, 0.4])
        nodes = {"image": img, "full": full}
        for where in ("cpu", "gpu") if gpu else ("cpu",):
            x, whole = (img.gpu(), full.gpu()) if where == "gpu" else (img, full)
            nodes.update({
                f"{where}/brightness": fn.brightness_contrast(x, brightness=d["b"]),
                f"{where}/contrast": A.adjust_contrast(x, d["c"]),
                f"{where}/saturation": fn.hsv(x, saturation=d["s"]),
                f"{where}/hue": A.adjust_hue(x, d["h"]),
                f"{where}/hsv_hue": fn.hsv(x, hue=360.0 * d["h"]),
                f"{where}/blur": A.gaussian_blur(x, d["sigma"], 23),
                f"{where}/flip": fn.crop_mirror_normalize(x, mirror=d["mirror"], dtype=types.UINT8,
                                                          output_layout="HWC"),
                f"{where}/crop": A.resize_window(whole, d["anchor"], d["shape"], SIZE),
                # the default maths (color_ops=deepmind): a brightness delta, per-channel contrast, HSV saturation
                f"{where}/brightness_shift": fn.brightness_contrast(x, brightness_shift=d["delta"]),
                f"{where}/channel_contrast": A.channel_contrast(x, d["c"]),
                f"{where}/hsv_saturation": A.hsv_saturation(x, d["s"]),
            })
        nodes.update({f"draw/{k}": v for k, v in d.items()})
        return nodes
    return graph


def twin_graph(files: list[str], gpu: bool, noise: bool = False) -> Callable[[], dict]:
    """`two_view_pipeline`'s folder graph with the debug draws and the CPU decoder, its images moved to the GPU after
    decoding with `gpu`; `noise` adds a deterministic +-1 grey level to each view's crop (no random operator, so the
    draws stay the same). Outputs as the loader names them (`view1`, `view2`, `index`, `view1/flip`, ...)."""
    aug = AugmentConfig()

    def graph() -> dict:
        jpegs, index = fn.readers.file(files=files, labels=list(range(len(files))), random_shuffle=False,
                                       name="Reader")
        shapes = fn.peek_image_shape(jpegs)
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        if gpu:
            images = images.gpu()
        views, draws = [], []
        for spec in (aug.view1, aug.view2):   # the loop of two_view_pipeline (random_crop_decoder off)
            anchor, shape = A.crop_window(shapes, spec)
            cropped = A.resize_window(images, anchor, shape, SIZE)
            if noise:
                x = fn.cast(cropped, dtype=types.INT16)
                cropped = fn.cast(dmath.clamp(x + x % 3 - 1, 0, 255), dtype=types.UINT8)
            drawn: dict = {}
            views.append(A.augment_view(cropped, spec, SIZE, aug.mean, aug.std, types.FLOAT, drawn, True, 0,
                                        aug.color_ops))
            drawn.update(crop_anchor=anchor, crop_shape=shape)
            draws.extend(drawn[k] for k in DEBUG_DRAWS)
        names = ["view1", "view2", "index"] + [f"view{v}/{k}" for v in (1, 2) for k in DEBUG_DRAWS] + ["image_shape"]
        return dict(zip(names, [*views, index, *draws, shapes]))
    return graph


def grey(view: np.ndarray) -> np.ndarray:
    """A normalised float HWC view back to grey levels."""
    aug = AugmentConfig()
    return view.astype(np.float64) * 255 * np.array(aug.std) + 255 * np.array(aug.mean)


def differences(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.abs(x.astype(np.float64) - y.astype(np.float64)).ravel() for x, y in zip(a, b)])


def view_differences(x: dict, y: dict) -> dict[str, tuple[float, float, float]]:
    """Per view, of |x - y| in grey levels: the largest mean of one sample, the 99.9th percentile and the max."""
    out = {}
    for v in ("view1", "view2"):
        per_sample = [np.abs(grey(a) - grey(b)) for a, b in zip(x[v], y[v])]
        d = np.concatenate([p.ravel() for p in per_sample])
        out[v] = (max(float(p.mean()) for p in per_sample), float(np.percentile(d, 99.9)), float(d.max()))
    return out


def assert_draws_vary(out: dict) -> None:
    """The batch's draws spread enough that a factor applied to the wrong sample, or one factor to all, shows."""
    d = {k: np.array([np.asarray(v).ravel()[0] for v in out[f"draw/{k}"]]) for k in ("b", "c", "h", "sigma", "mirror")}
    assert d["b"].std() > 0.1 and d["c"].std() > 0.1 and np.ptp(d["h"]) > 0.05 and d["sigma"].std() > 0.3, d
    assert 0 < d["mirror"].sum() < BATCH, d["mirror"]


def assert_same_draws(x: dict, y: dict) -> None:
    for k in x:
        if "/" in k or k in ("index", "image_shape"):
            for i, (a, b) in enumerate(zip(x[k], y[k])):
                assert np.array_equal(a, b), f"{k} of sample {i}: {a} vs {b} (the twins did not draw alike)"


def loader_epoch(files: list[str], decoder: str, device: str) -> list[tuple]:
    """One epoch of `DaliTwoViewLoader` over the folder of `files` with the debug draws: (view1, view2, index, draws)
    per batch, on the CPU; the graph ops on the CPU too (`cpu_kernels=False`)."""
    cfg = DataConfig(backend="dali", path=str(Path(files[0]).parent.parent), image_size=SIZE,
                     dali=DaliConfig(num_threads=2, decoder=decoder, cpu_kernels=False))
    ctx = LoaderContext(device=torch.device(device), dtype=torch.float32, batch_size=BATCH, seed=SEED)
    loader = DaliTwoViewLoader(cfg, ctx, debug_params=True)
    assert loader.decoder == decoder
    loader.set_epoch(0)
    return [(batch.view1.cpu(), batch.view2.cpu(), batch.index.cpu(), params)
            for batch, params in loader.iter_with_params()]


def compare_loader_epochs(gpu: list[tuple], cpu: list[tuple]) -> None:
    assert len(gpu) == len(cpu) > 0
    std = torch.tensor(AugmentConfig().std).view(1, 3, 1, 1) * 255
    for (g1, g2, gi, gp), (c1, c2, ci, cp) in zip(gpu, cpu):
        assert torch.equal(gi, ci)
        assert set(gp) == set(cp) and len(cp) == 2 * len(DEBUG_DRAWS) + 1
        for k in cp:
            assert torch.equal(gp[k], cp[k]), f"{k}: the two pipelines drew differently"
        for name, g, c in (("view1", g1, c1), ("view2", g2, c2)):
            per_sample = ((g - c) * std).abs().flatten(1).mean(1)
            print(f"{name}: per-sample mean {[round(x, 2) for x in per_sample.tolist()]} grey levels")
            assert per_sample.max() < LOADER_MEAN, f"{name}: {per_sample.tolist()} grey levels"


# ------------------------------------------------------------------------------------------------------- on the CPU
def test_per_sample_ops_match_torchvision_sample_by_sample(files):
    """The CPU side of the GPU comparison: each sample's output is torchvision's op with that sample's own draw."""
    import torchvision.transforms.v2.functional as F

    from byolfast.pipeline import device_augment as D

    out = run(ops_graph(files, gpu=False), gpu=False)
    assert_draws_vary(out)
    d = {k[5:]: [np.asarray(v).reshape(-1) for v in vals] for k, vals in out.items() if k.startswith("draw/")}
    refs = {
        "brightness": lambda x, i: F.adjust_brightness(x, float(d["b"][i][0])),
        "contrast": lambda x, i: F.adjust_contrast(x, float(d["c"][i][0])),
        "saturation": lambda x, i: F.adjust_saturation(x, float(d["s"][i][0])),
        "hue": lambda x, i: F.adjust_hue(x, float(d["h"][i][0])),
        "blur": lambda x, i: F.gaussian_blur(x, [23, 23], [float(d["sigma"][i][0])] * 2),
        "flip": lambda x, i: x.flip(-1) if d["mirror"][i][0] else x,
        # the default maths against the batched torch ops of pipeline.device_augment (one sample each)
        "brightness_shift": lambda x, i: D.add_brightness(x[None], torch.tensor([float(d["delta"][i][0])]))[0],
        "channel_contrast": lambda x, i: D.channel_contrast(x[None], torch.tensor([float(d["c"][i][0])]))[0],
        "hsv_saturation": lambda x, i: D.hsv_saturation(x[None], torch.tensor([float(d["s"][i][0])]))[0],
    }
    for i in range(BATCH):
        img = torch.from_numpy(out["image"][i]).permute(2, 0, 1).float() / 255
        for op, ref in refs.items():
            got = torch.from_numpy(out[f"cpu/{op}"][i]).permute(2, 0, 1).float()
            diff = (got - ref(img, i) * 255).abs()
            assert diff.max() <= 1.5 and diff.mean() < 0.5, f"{op}, sample {i}: max {diff.max()}, mean {diff.mean()}"
        # the crop window: (y, x) anchor and (h, w) shape of the decoded image, resized like a RandomResizedCrop
        (top, left), (h, w) = (int(v) for v in d["anchor"][i]), (int(v) for v in d["shape"][i])
        full = torch.from_numpy(out["full"][i]).permute(2, 0, 1).float() / 255
        ref = F.resized_crop(full, top, left, h, w, [SIZE, SIZE], F.InterpolationMode.BICUBIC, antialias=True)
        diff = (torch.from_numpy(out["cpu/crop"][i]).permute(2, 0, 1).float() - ref.clamp(0, 1) * 255).abs()
        # measured here: mean 0.2-0.5 (DALI's antialiased cubic is not PIL's bicubic); a window read with x and y
        # swapped, or cut from another sample, is tens of grey levels off
        assert diff.mean() < 1.0, f"crop, sample {i}: mean {diff.mean()}"


def test_twin_graph_is_the_loaders_graph(files):
    """The twins hold the operators of `two_view_pipeline` (CPU decoder, graph ops, debug draws) in the same order,
    with the same arguments: the same seed gives them the loader's draws; the GPU twin differs only in the device."""
    from nvidia.dali.pipeline import Pipeline

    def sequence(pipe: Pipeline, devices: bool = False) -> list:
        pipe._build_graph()
        return [(type(op._op).__name__,   # not the names: unused debug defaults take ids in the loader's graph
                 repr(sorted((k, v) for k, v in op._op._init_args.items() if not k.startswith("_origin")
                             and (devices or k != "device"))))
                for op in pipe._ops]

    def traced(graph: Callable[[], dict], gpu: bool) -> Pipeline:
        @pipeline_def(enable_conditionals=True)
        def pipe_def():
            return tuple(graph().values())
        return pipe_def(batch_size=BATCH, num_threads=2, device_id=0 if gpu else None, seed=SEED)

    loader = two_view_pipeline(
        source={"kind": "folder", "files": files, "indices": list(range(len(files)))}, aug=AugmentConfig(),
        image_size=SIZE, decoder="cpu", random_crop_decoder=False, hw_decoder_load=0.0, out_dtype=types.FLOAT,
        debug=True, exact_hue=True, cpu_threads=0, batch_size=BATCH, num_threads=2, device_id=None, seed=SEED)
    cpu_twin = traced(twin_graph(files, gpu=False), gpu=False)
    assert sequence(cpu_twin, devices=True) == sequence(loader, devices=True)
    assert sequence(traced(twin_graph(files, gpu=True), gpu=True)) == sequence(loader)


def test_twin_tolerance_covers_one_level_of_noise(files):
    """The whole-view tolerance against what one grey level of difference in the crops becomes (on the CPU)."""
    clean = run(twin_graph(files, gpu=False), gpu=False)
    noisy = run(twin_graph(files, gpu=False, noise=True), gpu=False)
    assert_same_draws(clean, noisy)
    measured = view_differences(clean, noisy)
    print("one level of noise in the crops ->", {v: tuple(round(x, 3) for x in m) for v, m in measured.items()})
    for v, (mean, p999, worst) in measured.items():
        assert worst >= 1, "the noise reached the views"
        assert mean < TWIN_MEAN / 2 and p999 <= TWIN_P999 / 2 and worst <= TWIN_MAX / 2, \
            f"{v}: {mean}, {p999}, {worst}"


def test_loader_comparison_and_gpu_graphs_on_the_cpu(files):
    """What the GPU tests run, as far as a CPU goes: their GPU pipelines trace (device 0, no device needed), and the
    loader comparison passes for two CPU epochs of one seed."""
    for graph in (ops_graph(files, gpu=True), twin_graph(files, gpu=True)):
        @pipeline_def(enable_conditionals=True)
        def pipe_def():
            return tuple(graph().values())
        pipe = pipe_def(batch_size=BATCH, num_threads=2, device_id=0, seed=SEED)
        pipe._build_graph()
        assert {op._op.device for op in pipe._ops} == {"cpu", "gpu"}
    compare_loader_epochs(loader_epoch(files, "cpu", "cpu"), loader_epoch(files, "cpu", "cpu"))


# ------------------------------------------------------------------------------------------------------- on the GPU
@pytest.mark.gpu
@needs_cuda
def test_per_sample_ops_on_gpu_match_cpu(files):
    out = run(ops_graph(files, gpu=True), gpu=True)
    measured = {}
    for op in OPS:
        diff = differences(out[f"cpu/{op}"], out[f"gpu/{op}"])
        measured[op] = (float(diff.max()), round(float(diff.mean()), 4))
    print("GPU vs CPU per op (max, mean grey levels):", measured)
    assert_draws_vary(out)
    for op, (worst, mean) in measured.items():
        limit = (2, 0.1) if op == "crop" else (1, 0.05)
        assert worst <= limit[0] and mean < limit[1], f"{op}: max {worst}, mean {mean} (limits {limit})"


@pytest.mark.gpu
@needs_cuda
def test_twin_views_on_gpu_match_cpu(files):
    cpu = run(twin_graph(files, gpu=False), gpu=False)
    gpu = run(twin_graph(files, gpu=True), gpu=True)
    assert_same_draws(cpu, gpu)
    measured = view_differences(cpu, gpu)
    print("GPU vs CPU twin views (mean, p99.9, max grey levels):", measured)
    for v, (mean, p999, worst) in measured.items():
        assert mean < TWIN_MEAN and p999 <= TWIN_P999 and worst <= TWIN_MAX, f"{v}: {mean}, {p999}, {worst}"


@pytest.mark.gpu
@needs_cuda
def test_mixed_loader_matches_its_cpu_twin(files):
    """The production path: nvJPEG (with the hardware decoder's default share) and the GPU graph against the CPU
    decoder and the CPU graph ops, one seed, one epoch of the same folder."""
    compare_loader_epochs(loader_epoch(files, "mixed", "cuda"), loader_epoch(files, "cpu", "cpu"))
