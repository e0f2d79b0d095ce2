"""Every augmentation engine against `pipeline.augment_spec`: the same op names in the spec's order, the draws in the
spec's layout, and, fed the same draws, the same pixels.

Engines: `torch` (the batched ops of `pipeline.device_augment`, the reference of the pixel checks, which
`tests/test_device_augment.py` and `tests/test_color_ops.py` hold to torchvision and to the paper's formulas), `numba`
(`pipeline.cpu_augment`'s kernels), `dali-graph` and `dali-kernel` (`pipeline.dali_augment.apply_view` on CPU
images, with the graph ops and with the numba operator), and their GPU forms `torch-cuda` and `dali-gpu`, skipped
with a reason where there is no CUDA device (as every DALI engine is where DALI is not installed).

The pixel check runs one batch per engine and maths: rows in groups, each group one op alone (flip, each jitter op,
grayscale, blur, solarize, only the normalisation) with its draw, a group with every op on (which tells any two ops'
order apart) and a group of whole chains as the spec's draws fall. Outputs are compared on [0, 1] pixels
(un-normalised) with the `torch` engine's. Tolerances: float32 engines (`numba`, `dali-kernel`: the numba
operator inside DALI, `torch-cuda`) `FLOAT_ATOL`; the DALI graph engines work on uint8 and round after each op, and
DALI's own ops use its luma (0.299 red): `DALI_OP_ATOL` for one op, `DALI_CHAIN_ATOL` (max) and `DALI_CHAIN_MEAN`
(mean) for the groups of several ops.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from byolfast.pipeline import augment_spec as S
from byolfast.pipeline import cpu_augment, device_augment
from byolfast.pipeline.config import COLOR_OPS, IMAGENET_MEAN, IMAGENET_STD, ViewSpec
from byolfast.pipeline.device_augment import BatchedViewAugment

SIZE = 32
ROWS = 8   # rows per case
CASES = ("flip",) + S.JITTER_OPS + ("grayscale", "blur", "solarize", "normalise", "all", "chain")
# Every op possible per sample (p 0.5), strengths that reach the ops' clipping, a 9-tap blur at SIZE.
SPEC = ViewSpec(flip_p=0.5, jitter_p=0.5, brightness=0.4, contrast=0.4, saturation=0.6, hue=0.3, grayscale_p=0.5,
                blur_p=0.5, blur_kernel_frac=0.25, solarize_p=0.5)
FLOAT_ATOL = 2e-6
DALI_OP_ATOL = 1.0 / 255
DALI_CHAIN_ATOL = 3.0 / 255
DALI_CHAIN_MEAN = 0.5 / 255
ENGINES = ("torch", "numba", "dali-graph", "dali-kernel", "torch-cuda", "dali-gpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def _crops() -> torch.Tensor:
    """uint8 (len(CASES) * ROWS, SIZE, SIZE, 3): four photographs in turn."""
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    small = [np.array(Image.fromarray(p).resize((SIZE, SIZE), Image.Resampling.BICUBIC)) for p in photos]
    return torch.from_numpy(np.stack([small[i % 4] for i in range(len(CASES) * ROWS)]))


def _augment(maths: str) -> BatchedViewAugment:
    return BatchedViewAugment(SPEC, IMAGENET_MEAN, IMAGENET_STD, SIZE, apply_flip=True, color_ops=maths)


@functools.lru_cache(maxsize=None)
def _case_params(maths: str) -> dict[str, torch.Tensor]:
    """The draws of every row: in the group of each case, that op alone with its drawn value (identities elsewhere);
    in the `all` group every op with its drawn value; in the `chain` group, the spec's draws as they fall."""
    drawn = _augment(maths).sample_params(len(CASES) * ROWS, "cpu", torch.Generator().manual_seed(0))
    params = {k: v.clone() for k, v in drawn.items()}
    identity = {"brightness": 0.0 if maths == "deepmind" else 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
    for c, case in enumerate(CASES):
        rows = slice(c * ROWS, (c + 1) * ROWS)
        if case in ("all", "chain"):
            for d in S.DRAWS:
                if d.kind == "coin" and case == "all":
                    params[d.name][rows] = True
            continue
        for d in S.DRAWS:
            if d.kind == "coin":
                params[d.name][rows] = d.name == case
        for name, value in identity.items():
            params[name][rows] = value
        params["order"][rows] = torch.arange(4)
        if case in S.JITTER_OPS:
            op = S.JITTER_OPS.index(case)
            params["jitter"][rows] = True
            params[case][rows] = drawn[case][rows]
            params["order"][rows] = torch.tensor([op] + [o for o in range(4) if o != op])
    return params


def _unnormalise(nchw: np.ndarray) -> np.ndarray:
    mean, std = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1), np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
    return nchw.astype(np.float64) * std + mean


def _feed(batch: list):
    """An external source's callable giving `batch` (a callable with a parameter would be handed the iteration)."""
    return lambda: batch


def _dali_run(maths: str, engine: str) -> np.ndarray:
    """`dali_augment.apply_view` on the crops with the rows' draws fed from external sources."""
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from nvidia.dali import fn, pipeline_def, types

    from byolfast.pipeline import dali_augment

    x = _crops().numpy()
    params = _case_params(maths)
    kinds = {"coin": (np.bool_, types.BOOL), "uniform": (np.float32, types.FLOAT), "order": (np.int32, types.INT32)}
    feeds = {}
    for d in S.DRAWS:
        if d.column is None:
            continue
        np_type, dali_type = (np.int32, types.INT32) if d.name == "flip" else kinds[d.kind]
        values = params[d.name].numpy()
        if d.kind == "order":
            values = [S.order_index(o) for o in values]
        feeds[d.name] = ([np.array(v, dtype=np_type) for v in values], dali_type)

    @pipeline_def(enable_conditionals=True, batch_size=len(x), num_threads=2, seed=0,
                  device_id=0 if engine == "dali-gpu" else None)
    def pipe():
        images = fn.external_source(source=_feed(list(x)), batch=True, layout="HWC", dtype=types.UINT8)
        if engine == "dali-gpu":
            images = images.gpu()
        drawn = {name: fn.external_source(source=_feed(values), batch=True, dtype=dtype)
                 for name, (values, dtype) in feeds.items()}
        return dali_augment.apply_view(images, SPEC, drawn, SIZE, IMAGENET_MEAN, IMAGENET_STD, types.FLOAT,
                                       cpu_threads=2 if engine == "dali-kernel" else 0, color_ops=maths)

    p = pipe()
    p.build()
    (out,) = p.run()
    if engine == "dali-gpu":
        out = out.as_cpu()
    return np.stack([np.array(t) for t in out]).transpose(0, 3, 1, 2)


@functools.lru_cache(maxsize=None)
def _engine_output(engine: str, maths: str) -> np.ndarray:
    """One engine's output for every row, un-normalised, (N, 3, SIZE, SIZE) float64."""
    if engine in ("torch-cuda", "dali-gpu") and not torch.cuda.is_available():
        pytest.skip(f"{engine} needs a CUDA device")
    aug, x, params = _augment(maths), _crops(), _case_params(maths)
    if engine == "torch":
        out = aug.apply(aug.to_float01(x), params)
    elif engine == "numba":
        out = aug.apply_cpu(x, params)
    elif engine == "torch-cuda":
        out = aug.cuda().apply(aug.to_float01(x.cuda()), {k: v.cuda() for k, v in params.items()}).cpu()
    else:
        return _unnormalise(_dali_run(maths, engine))
    return _unnormalise(out.numpy())


@pytest.mark.parametrize("maths", COLOR_OPS)
@pytest.mark.parametrize("engine", [pytest.param(e, marks=pytest.mark.gpu) if e in ("torch-cuda", "dali-gpu") else e
                                    for e in ENGINES if e != "torch"])   # gpu: collected by the GPU suite's `-m gpu`
def test_every_op_gives_the_reference_pixels(engine, maths):
    """Each engine, fed the reference's draws, against the `torch` engine, op by op and for whole chains."""
    out, ref = _engine_output(engine, maths), _engine_output("torch", maths)
    dali = engine in ("dali-graph", "dali-gpu")   # uint8 graph ops; the DALI kernel engine is the numba float path
    failures = []
    for c, case in enumerate(CASES):
        diff = np.abs(out[c * ROWS:(c + 1) * ROWS] - ref[c * ROWS:(c + 1) * ROWS])
        chain = case in ("all", "chain")
        atol = (DALI_CHAIN_ATOL if chain else DALI_OP_ATOL) if dali else FLOAT_ATOL
        if diff.max() > atol or (dali and chain and diff.mean() > DALI_CHAIN_MEAN):
            failures.append(f"{case}: max {diff.max():.3g} (atol {atol:.3g}), mean {diff.mean():.3g}")
    assert not failures, f"{engine} ({maths}) differs from the torch engine: " + "; ".join(failures)


def test_the_pixel_check_sees_every_op():
    """Each op group changes its images (flip, jitter ops, grayscale, blur, solarize), so the comparison means
    something; the chain group holds every op somewhere."""
    x = _unnormalise(((_crops().numpy().transpose(0, 3, 1, 2) / 255.0) - np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1))
                     / np.array(IMAGENET_STD).reshape(1, 3, 1, 1))
    for maths in COLOR_OPS:
        ref = _engine_output("torch", maths)
        for c, case in enumerate(CASES[:-3]):
            rows = slice(c * ROWS, (c + 1) * ROWS)
            assert np.abs(ref[rows] - x[rows]).max() > 0.02, f"{case} ({maths}) left its images unchanged"
        params = _case_params(maths)
        chain = slice((len(CASES) - 1) * ROWS, len(CASES) * ROWS)
        for d in S.DRAWS:
            if d.kind == "coin":
                assert params[d.name][chain].any(), f"no chain row draws {d.name}"


# --- the spec's tables and every engine's use of them -----------------------------------------------------------

def test_the_draw_table_is_a_layout():
    columns = [c for d in S.DRAWS if d.column is not None for c in range(d.column, d.column + d.width)]
    assert sorted(columns) == list(range(S.NUM_COLUMNS)), "the columns tile the uniform draw"
    for d in S.DRAWS:
        assert d.op in S.OPS and d.kind in ("coin", "uniform", "order", "crop"), d
        assert d.param is None or hasattr(SPEC, d.param), d
        assert (d.column is None) == (d.op == "crop"), d
    for order, before, after in zip(S.JITTER_ORDERS, S.SLOTS_BEFORE_HUE, S.SLOTS_AFTER_HUE):
        k = order.index(S.HUE)
        assert [op for op in before if op >= 0] + [S.HUE] + [op for op in after if op >= 0] == list(order)
        assert S.order_index(order) == S.JITTER_ORDERS.index(order) and len([op for op in before if op >= 0]) == k
    assert sorted(S.JITTER_ORDERS) == sorted(set(S.JITTER_ORDERS)) and len(S.JITTER_ORDERS) == 24


@pytest.mark.parametrize("maths", COLOR_OPS)
def test_the_torch_engine_reads_its_draws_from_the_table(maths):
    n = 512
    params = _augment(maths).sample_params(n, "cpu", torch.Generator().manual_seed(4))
    u = torch.rand(n, S.NUM_COLUMNS, generator=torch.Generator().manual_seed(4))
    assert set(params) == {d.name for d in S.DRAWS if d.column is not None}
    for d in S.DRAWS:
        if d.kind == "coin":
            assert torch.equal(params[d.name], u[:, d.column] < getattr(SPEC, d.param)), d.name
        elif d.kind == "uniform":
            lo, hi = S.draw_range(d, SPEC, maths)
            torch.testing.assert_close(params[d.name], lo + u[:, d.column] * (hi - lo), atol=1e-6, rtol=0)
        elif d.kind == "order":
            assert torch.equal(params[d.name], torch.argsort(u[:, d.column:d.column + d.width], dim=1))


def test_the_numba_kernel_packs_the_tables_draws():
    names = {d.name: d for d in S.DRAWS}
    for name, width in cpu_augment.KERNEL_PARAMS:
        assert name in ("hue_on", "reference") or names[name].width == width, name
    assert cpu_augment.VIEW_PARAMS == sum(w for _, w in cpu_augment.KERNEL_PARAMS)
    after_crop = {d.name for d in S.DRAWS if d.op != "crop"}
    assert after_crop <= {name for name, _ in cpu_augment.KERNEL_PARAMS}, "every draw after the crop is packed"


def test_the_dali_engine_draws_the_tables_draws():
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from nvidia.dali import pipeline_def

    from byolfast.pipeline import dali_augment
    from byolfast.pipeline.backends.dali import loader as dali_loader

    assert dali_loader.DEBUG_DRAWS == tuple(d.dali_name for d in S.DRAWS)
    keys = []

    @pipeline_def(batch_size=64, num_threads=1, device_id=None, seed=1)
    def pipe():
        drawn = dali_augment.draw_view(SPEC, "deepmind")
        keys.extend(drawn)
        return tuple(drawn.values())

    p = pipe()
    p.build()
    outs = dict(zip(keys, (np.array([np.asarray(t) for t in o]) for o in p.run())))
    assert keys == [d.name for d in S.DRAWS if d.column is not None], "the table's draws, in its order"
    for d in S.DRAWS:
        v = outs.get(d.name)
        if d.kind == "coin":
            assert set(np.unique(v)) <= {0, 1} and 0 < v.mean() < 1, d.name
        elif d.kind == "uniform":
            lo, hi = S.draw_range(d, SPEC, "deepmind")
            assert v.min() >= lo and v.max() <= hi and v.std() > 0, d.name
        elif d.kind == "order":
            assert v.min() >= 0 and v.max() < len(S.JITTER_ORDERS) and len(np.unique(v)) > 10


def _torch_loader_stages() -> list[tuple[str]]:
    from torchvision.transforms import v2

    from byolfast.pipeline.backends.torch.loader import ReferenceColorJitter, SpecGaussianBlur, build_view_transform

    names = {v2.RandomResizedCrop: "crop", v2.RandomHorizontalFlip: "flip", v2.RandomGrayscale: "grayscale",
             v2.RandomSolarize: "solarize", v2.Normalize: "normalise", v2.ColorJitter: "jitter",
             ReferenceColorJitter: "jitter", SpecGaussianBlur: "blur"}
    stages = []
    for maths in COLOR_OPS:
        found = []
        for t in build_view_transform(SPEC, SIZE, IMAGENET_MEAN, IMAGENET_STD, maths).transforms:
            inner = t.transforms[0] if isinstance(t, v2.RandomApply) else t
            if not isinstance(t, v2.ToDtype):
                found.append((names[type(inner)],))
        stages.append(found)
    assert stages[0] == stages[1]
    return stages[0]


def _stages(engine: str):
    if engine == "torch":
        return device_augment.STAGES
    if engine == "numba":
        return cpu_augment.STAGES
    if engine in ("dali", "dali_kernel"):
        pytest.importorskip("nvidia.dali", reason="DALI is not installed")
        from byolfast.pipeline import dali_augment
        return dali_augment.STAGES if engine == "dali" else dali_augment.KERNEL_STAGES
    return _torch_loader_stages()


@pytest.mark.parametrize("engine", ["torch", "numba", "dali", "dali_kernel", "torch_loader"])
def test_every_engine_runs_exactly_the_specs_ops_in_its_order(engine):
    ops = S.OPS if engine == "torch_loader" else tuple(op for op in S.OPS if op != "crop")
    S.check_stages(_stages(engine), ops)


def test_stage_check_rejects_a_wrong_order():
    ops = S.OPS[1:]
    S.check_stages([("jitter",), ("grayscale",), ("blur",), ("solarize",), ("flip", "normalise")], ops)
    for bad in ([("flip",), ("grayscale",), ("jitter",), ("blur",), ("solarize",), ("normalise",)],
                [("flip",), ("jitter",), ("grayscale",), ("blur",), ("normalise",), ("solarize",)],
                [("jitter",), ("grayscale",), ("blur",), ("solarize",), ("normalise",)],
                [("jitter",), ("grayscale",), ("blur",), ("solarize",), ("normalise",), ("flip",)]):
        with pytest.raises(ValueError):
            S.check_stages(bad, ops)


def test_every_engine_implements_every_jitter_op_in_both_maths():
    tables = {"torch": device_augment.JITTER_FUNCTIONS, "numba": cpu_augment.JITTER_KERNELS}
    try:
        from byolfast.pipeline import dali_augment
        tables["dali"] = dali_augment.JITTER_FUNCTIONS
    except ImportError:
        pass   # DALI's engine is checked where DALI is installed
    for engine, table in tables.items():
        assert set(table) == set(COLOR_OPS), engine
        for maths, ops in table.items():
            assert tuple(ops) == S.JITTER_OPS and all(callable(f) for f in ops.values()), (engine, maths)


def test_every_engine_cuts_the_blur_at_the_specs_radius():
    """The blur kernel ends at `blur_radius` (4 sigma, at most the spec's taps) in the torch module's kernels, the
    numba kernel and the torch backend's torchvision transform, and the cut moves a pixel by under 1e-4."""
    from torchvision.transforms.v2 import functional as F

    from byolfast.pipeline.backends.torch.loader import SpecGaussianBlur
    from byolfast.pipeline.device_ops import gaussian_blur, gaussian_kernels

    sigmas = torch.tensor([0.1, 0.3, 0.74, 1.0, 1.3, 2.0, 2.9])
    kernels = gaussian_kernels(sigmas, 23)
    for s, k in zip(sigmas.tolist(), kernels):
        r = S.blur_radius(s, 23)
        assert r == min(11, int(np.ceil(4 * np.float32(s)))) and (k > 0).sum() == 2 * r + 1, s
    x = torch.rand(len(sigmas), 3, 40, 40, generator=torch.Generator().manual_seed(0))
    ref = gaussian_blur(x, sigmas, 23)
    spec_blur = SpecGaussianBlur(23)
    for i, s in enumerate(sigmas.tolist()):
        out = spec_blur.transform(x[i], {"sigma": [s, s]})
        torch.testing.assert_close(out, ref[i], atol=2e-6, rtol=0)
        full = F.gaussian_blur(x[i], [23, 23], [s, s])   # torchvision's uncut kernel
        assert (out - full).abs().max() < 1e-4
    nhwc = x.permute(0, 2, 3, 1).contiguous().numpy()
    scratch = np.empty((40, (40 + 2 * 11) * 3), np.float32)
    for i, s in enumerate(sigmas.numpy()):
        cpu_augment._blur_one(nhwc[i], scratch, s, 11)
    torch.testing.assert_close(torch.from_numpy(nhwc).permute(0, 3, 1, 2), ref, atol=2e-6, rtol=0)
