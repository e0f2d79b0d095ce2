"""`byol bench --what stages` (`benchmarks.stages`): every backend with a CPU path reports each of its stages, timed
per image on a few tiny real JPEGs; one that cannot run is reported as skipped, with the reason."""
from __future__ import annotations

import json

import pytest
import torch

from byolfast.benchmarks import stages
from byolfast.benchmarks.bench_data import build_bench_images
from byolfast.pipeline.config import DaliConfig, DataConfig

TINY = ["data.image_size=16", "train.batch_size=4", "train.precision=fp32", "train.num_threads=1",
        "data.num_workers=0", "data.dali.num_threads=1"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_bench_images(tmp_path_factory.mktemp("stages"), 8, size=(64, 48))


def _check(ms: dict, names) -> None:
    assert list(ms) == [*names, "total"]
    assert all(ms[s] >= 0 for s in names) and ms["total"] == pytest.approx(sum(ms[s] for s in names))
    assert all(s in stages.STAGE_GROUPS for s in names)


def test_torch_stages_time_the_loaders_transforms(folder):
    ms = stages.torch_stage_ms(DataConfig(image_size=16), sorted(folder.glob("*/*.jpg")), repeats=1)
    _check(ms, stages.TORCH_STAGES)
    # decode, crop and normalise run on every sample; both views, so the colour ops run too at these probabilities
    assert all(ms[s] > 0 for s in ("decode", "crop_flip", "to_float", "jitter", "blur", "normalise"))


def test_an_unknown_torch_transform_is_an_error():
    with pytest.raises(ValueError, match="no stage for"):
        stages._torch_stage(torch.nn.Identity())


def test_dali_stages_run_one_pipeline_per_stage(folder):
    pytest.importorskip("nvidia.dali")
    ms = stages.dali_stage_ms(DataConfig(image_size=16), sorted(folder.glob("*/*.jpg")), repeats=1)
    _check(ms, stages.DALI_STAGES)
    # the crop inside the numba operator is a difference of two passes (floored at 0): on these small images it can
    # be within the noise; the graph's crop (`fn.resize`) is a pass of its own
    assert all(ms[s] > 0 for s in ("decode", "normalise")) and ms["crop"] >= 0
    graph = stages.dali_stage_ms(DataConfig(image_size=16, dali=DaliConfig(cpu_kernels=False)),
                                 sorted(folder.glob("*/*.jpg")), repeats=1)
    assert graph["crop"] > 0


def test_stage_fields_shares_and_groups():
    fields = stages.stage_fields({"decode": 3.0, "crop_flip": 1.0, "jitter": 0.5, "grayscale": 0.5, "total": 5.0})
    assert fields["total_ms_per_image"] == pytest.approx(5.0)
    assert sum(fields["stage_share"].values()) == pytest.approx(1.0)
    assert fields["group_ms"] == {"decode": 3.0, "crop": 1.0, "colour": 1.0, "blur": 0.0, "normalise": 0.0,
                                  "other": 0.0}
    assert "decode 60%" in fields["note"]


def test_bench_stages_table_and_json(tmp_path, folder, monkeypatch):
    """Every backend measured has every stage, positive, shares summing to one; a backend whose package is missing
    is skipped with the reason, in the JSON and in the printed table."""
    from byolfast.benchmarks import bench

    def missing(*args):
        raise ModuleNotFoundError("No module named 'ffcv'", name="ffcv")

    monkeypatch.setitem(stages.STAGE_TIMERS, "ffcv", missing)
    monkeypatch.setattr(bench, "build_bench_images", lambda root, n, **kw: folder)
    out = tmp_path / "stages.json"
    backends = ["torch", "ffcv"] + (["dali"] if _has("nvidia.dali") else [])
    assert bench.main(["--what", "stages", "--out", str(out), "--repeats", "1", "--stage-images", "8",
                       "--backends", ",".join(backends), "--data", str(tmp_path), *TINY]) == 0
    records = {r["backend"]: r for r in json.loads(out.read_text())["records"]}
    assert list(records) == backends and all(r["what"] == "stages" for r in records.values())
    assert records["ffcv"]["skipped"] == "ffcv is not installed" and "error" not in records["ffcv"]
    for backend in set(backends) - {"ffcv"}:
        r = records[backend]
        names = stages.TORCH_STAGES if backend == "torch" else stages.DALI_STAGES
        assert list(r["stage_ms"]) == list(names) and "error" not in r
        assert all(r["stage_ms"][s] >= 0 for s in names) and r["total_ms_per_image"] > 0
        assert r["stage_ms"]["decode"] > 0 and r["stage_ms"]["normalise"] > 0
        assert sum(r["stage_share"].values()) == pytest.approx(1.0)
        assert (r["images"], r["resolution"], r["threads"]) == (8, 16, 1)
    table = stages.stage_table(list(records.values()))
    assert "stages ffcv: skipped: ffcv is not installed" in table
    assert "stages torch (CPU ms per image" in table and "crop_flip" in table and "by group: decode" in table


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
