"""One registry of backends: every record is whole, and a fifth backend registered in one place is seen everywhere
that offers or switches on a backend (the loader factory, the config's validation, `byol convert`, `byol bench`,
`byol tune`'s knobs, the profiler's advice)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from byolfast.pipeline import BACKENDS, DataConfig, LoaderContext, build_two_view_loader
from byolfast.pipeline.backends import Backend, Knob, Writer
from byolfast.pipeline.backends.dali.settings import DaliConfig
from byolfast.pipeline.backends.synthetic.loader import SyntheticTwoViewLoader
from byolfast.pipeline.contract import DataError
from byolfast.train.config import ConfigError, load_config


def test_every_backend_record_is_whole():
    data = DataConfig()
    for name, b in BACKENDS.items():
        assert isinstance(b, Backend) and b.name == name and b.summary
        assert callable(b.loader) and callable(b.advice)
        assert b.bench_path is None or callable(b.bench_path)
        if b.settings is not None:   # its section is `data.<name>`, valid by default, and checks itself
            assert isinstance(getattr(data, name), b.settings)
            assert getattr(data, name).problems() == []
        if b.writer is not None:
            assert isinstance(b.writer, Writer) and b.bench_path is not None
            assert all(callable(f) for f in (b.writer.settings, b.writer.complete, b.writer.write))
        tips = b.advice(dataclasses.replace(data, backend=name), "cuda", 64, {})
        assert isinstance(tips, list) and all(isinstance(t, str) for t in tips)
        for device_type in ("cpu", "cuda"):   # every knob names a real setting, and the first is the parallelism
            knobs = b.knobs(device_type, (1, 2, 4))
            assert all(isinstance(k, Knob) and k.key.startswith("data.") for k in knobs)
            for k in knobs:
                section = data
                for part in k.key.split(".")[1:]:
                    section = getattr(section, part)
            assert not knobs or knobs[0].values == (1, 2, 4)
        assert isinstance(b.requires, tuple) and b.first_start_s >= 0


def test_sections_check_themselves_and_the_config_names_the_key():
    assert [k for k, _, _ in DaliConfig(num_threads=0, decoder="gpu").problems()] == ["decoder", "num_threads"]
    with pytest.raises(ConfigError, match=r"data\.ffcv\.order='shuffled'.*random, quasi_random or sequential"):
        load_config(None, ["data.ffcv.order=shuffled"])
    with pytest.raises(ConfigError, match=r"data\.dali\.hw_decoder_load"):
        load_config(None, ["data.dali.hw_decoder_load=2"])


# --- a fifth backend, registered only in this test ------------------------------------------------------------------
class _FakeLoader(SyntheticTwoViewLoader):
    """The synthetic loader under another name: what matters is that the registry built it."""


def _fake_loader(cfg, ctx):
    return _FakeLoader(cfg, ctx)


def _fake_write(folder: Path, refs, classes, settings: dict, job) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "list.json").write_text(json.dumps({"settings": settings, "refs": [list(r) for r in refs]}))
    return {"status": "written", "path": str(folder), "num_samples": len(refs), "bytes": 0}


def _fake_complete(folder: Path, settings: dict):
    try:
        done = json.loads((folder / "list.json").read_text())
    except OSError:
        return None
    return {"status": "complete", "path": str(folder), "num_samples": len(done["refs"]), "bytes": 0}


FAKE = Backend(name="fake", summary="a test's backend", loader=_fake_loader, settings=None,
               writer=Writer(settings=lambda base, options: {**base, "kind": "list"}, complete=_fake_complete,
                             write=_fake_write, uses_pool=False),
               bench_path=lambda converted: str(converted / "fake"),
               advice=lambda cfg, device_type, cpu_count, stats: ["try the fake loader's own knob"],
               knobs=lambda device_type, ladder: [Knob("data.num_workers", ladder, True)])


@pytest.fixture()
def fake(monkeypatch):
    monkeypatch.setitem(BACKENDS, "fake", FAKE)
    return FAKE


def test_a_fifth_backend_builds_and_validates(fake):
    cfg = load_config(None, ["data.backend=fake", "data.synthetic_size=8", "data.image_size=8"])
    ctx = LoaderContext(device=torch.device("cpu"), dtype=torch.float32, batch_size=4, seed=0)
    loader = build_two_view_loader(cfg.data, ctx)
    assert isinstance(loader, _FakeLoader) and len(loader) == 2


def test_without_its_registry_line_the_backend_is_unknown():
    with pytest.raises(ConfigError, match="data.backend='fake'.*one of dali, ffcv, torch, synthetic"):
        load_config(None, ["data.backend=fake"])
    ctx = LoaderContext(device=torch.device("cpu"), dtype=torch.float32, batch_size=4, seed=0)
    with pytest.raises(DataError, match="unknown data.backend 'fake'"):
        build_two_view_loader(DataConfig(backend="fake"), ctx)


def test_a_fifth_backend_is_offered_by_the_cli_bench_tune_and_profiler(fake, tmp_path):
    from byolfast.benchmarks import bench, bench_data
    from byolfast.benchmarks.report import RunFacts, input_advice
    from byolfast.benchmarks.tune_search import knobs
    from byolfast.train.cli import build_parser

    args = build_parser().parse_args(["convert", "src", "out", "--format", "fake"])
    assert args.format == "fake"
    bargs = bench.build_parser().parse_args(["--backends", "fake,torch"])
    bench._resolve_args(bargs, torch.device("cpu"))   # raises ConfigError on an unknown backend
    assert bargs.backends == ["fake", "torch"]
    assert input_advice(RunFacts(data=DataConfig(backend="fake"))) == ["try the fake loader's own knob"]
    assert [k.key for k in knobs("fake", "cpu", 2)] == ["data.num_workers"]   # what `byol tune` searches

    tree = tmp_path / "tree"
    for k in range(3):
        (tree / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 16), (40 * k, 90, 200)).save(tree / "a" / f"{k}.jpg")
    path = bench_data.backend_path(tree, "fake")   # converts with the fake's writer, as `byol bench` does
    assert path == str(tmp_path / "converted" / "fake")
    assert len(json.loads((Path(path) / "list.json").read_text())["refs"]) == 3
    report = json.loads((tmp_path / "converted" / "convert_report.json").read_text())
    assert report["outputs"]["fake"]["status"] == "written"
