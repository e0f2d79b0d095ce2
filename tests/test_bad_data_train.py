"""The trainer end to end over a folder with broken files, with each backend: the run ends saying what it skipped.

The folder holds 23 RGB JPEGs, one CMYK JPEG and three bad files: a JPEG cut in half, a file of zero bytes and a
text file named `.jpg`. What each backend does with them:
  - `torch` reads the folder; a bad file is replaced by another sample when it is met, and counted (`bad_images`);
  - `dali` reads the folder; its start-up check leaves the bad files out and counts them (`bad_images`);
  - `ffcv` and `dali` on shards read `byol convert`'s output; convert skipped the bad files and re-encoded the CMYK
    one, and the loader reports the skips from `convert_report.json` (`convert_skipped`).
The CMYK image is decoded (torch: PIL; DALI: its CPU decoder, identical to PIL here) or re-encoded to RGB (convert):
it is trained on, never skipped. The batch sizes make one epoch visit every image, so every bad file is met.

FFCV compiles its pipeline on its first epoch (15-30 s per process): it trains once, on the module's conversion.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_overrides
from byolfast.pipeline.contract import Batch, TwoViewLoader
from byolfast.pipeline.convert import convert_dataset
from byolfast.pipeline.folder import scan_image_folder
from byolfast.train import loop
from byolfast.train.cli import main as byol
from byolfast.train.config import load_config

GOOD, SIDE = 23, (32, 24)  # RGB JPEGs of 32x24 px; with the CMYK one, 24 images to train on
BAD = {"a/cut_in_half.jpg": "corrupt", "a/zero_bytes.jpg": "empty file", "b/notes.jpg": "not an image"}
CMYK = "b/cmyk.jpg"
STEPS = 3  # one epoch: 27 files / batch 9 (torch), 24 images / batch 8 (the others)


def _write_tree(root: Path) -> Path:
    for k in range(GOOD):
        y, x = np.mgrid[0:SIDE[1], 0:SIDE[0]]
        rgb = np.stack([(x * 8 + k * 20) % 256, (y * 10 + k * 7) % 256, ((x + y) * 5 + k) % 256], -1)
        path = root / ("a" if k % 2 else "b") / f"{k:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb.astype(np.uint8)).save(path, quality=90)
    whole = (root / "a" / "01.jpg").read_bytes()
    (root / "a" / "cut_in_half.jpg").write_bytes(whole[:len(whole) // 2])
    (root / "a" / "zero_bytes.jpg").write_bytes(b"")
    (root / "b" / "notes.jpg").write_text("a caption, not a picture\n")
    Image.open(root / "a" / "03.jpg").convert("CMYK").save(root / CMYK, quality=90)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _write_tree(tmp_path_factory.mktemp("bad_tree"))


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    convert_dataset(str(tree), str(out), workers=2, shard_size=10, progress=False)
    return out


def _relative(tree: Path, paths) -> list[str]:
    return sorted(Path(p).relative_to(tree).as_posix() for p in paths)


class _Recording(TwoViewLoader):
    """A backend as built by the trainer, recording the dataset index of every sample it delivers."""

    def __init__(self, inner: TwoViewLoader):
        super().__init__(inner.ctx)
        self.inner, self.seen = inner, []

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.inner.set_epoch(epoch, start_batch)

    @property
    def stop_epoch(self):
        return self.inner.stop_epoch

    @stop_epoch.setter
    def stop_epoch(self, value) -> None:
        self.inner.stop_epoch = value

    def _iter_epoch(self) -> Iterator[Batch]:
        for batch in self.inner:
            self.seen.extend(batch.index.tolist())
            yield batch

    def stats(self) -> dict:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


def _train(monkeypatch, run: Path, data: Path, backend: str, batch: int, *extra: str) -> tuple[dict, list[int]]:
    """Train STEPS steps through the real trainer; the summary and the dataset indices it trained on."""
    built = []
    real = loop.build_two_view_loader

    def recording(cfg, ctx) -> _Recording:
        built.append(_Recording(real(cfg, ctx)))
        return built[-1]

    monkeypatch.setattr(loop, "build_two_view_loader", recording)
    overrides = tiny_overrides(run, str(data), backend, steps=STEPS, batch=batch) + ["data.max_bad_fraction=0.25",
                                                                                     *extra]
    summary = loop.Trainer(load_config(None, overrides)).run()
    assert summary["steps"] == STEPS and math.isfinite(summary["final_loss"])
    return summary, built[0].seen


def _last_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def _scan(tree: Path) -> list[str]:
    return [Path(p).relative_to(tree).as_posix() for p, _ in scan_image_folder(tree)[0]]


def test_torch_substitutes_and_counts_the_bad_files(tree, tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        summary, seen = _train(monkeypatch, tmp_path / "run", tree, "torch", 9)
    scan = _scan(tree)
    good = {i for i, rel in enumerate(scan) if rel not in BAD}
    assert len(scan) == 27 and set(seen) == good, "every good image, the CMYK one included, is trained on"
    assert scan.index(CMYK) in seen
    stats = summary["loader"]
    assert summary["skipped_images"] == stats["bad_images"] == 3 == _last_metrics(tmp_path / "run")["loader/bad_images"]
    assert _relative(tree, stats["bad_paths"]) == sorted(BAD)
    for rel in BAD:  # why: one warning per file, with PIL's reason
        assert f"cannot decode {tree / rel} (" in caplog.text
    assert "3 unreadable image files were not trained on" in caplog.text


def test_dali_folder_leaves_out_and_counts_the_bad_files(tree, tmp_path, monkeypatch, caplog):
    pytest.importorskip("nvidia.dali")
    with caplog.at_level(logging.WARNING):
        summary, seen = _train(monkeypatch, tmp_path / "run", tree, "dali", 8, "data.dali.decoder=cpu",
                               "data.dali.num_threads=1")
    scan = _scan(tree)
    assert sorted(seen) == [i for i, rel in enumerate(scan) if rel not in BAD], "each good image once, CMYK included"
    stats = summary["loader"]
    assert summary["skipped_images"] == stats["bad_images"] == 3 == _last_metrics(tmp_path / "run")["loader/bad_images"]
    assert _relative(tree, stats["bad_paths"]) == sorted(BAD)
    assert "leaving out 3 unreadable image file(s)" in caplog.text
    assert stats["pipelines_built"] == 1, "a run of one epoch builds no pipeline for the next"
    assert "3 unreadable image files were not trained on" in caplog.text


def _convert_skips_reported(summary: dict, converted: Path, caplog) -> None:
    stats = summary["loader"]
    report = converted / "convert_report.json"
    reasons = {"corrupt": 1, "empty file": 1, "not an image": 1}
    assert summary["skipped_images"] == stats["convert_skipped"] == 3 and stats.get("bad_images", 0) == 0
    assert stats["convert_skip_reasons"] == reasons and stats["convert_report"] == str(report)
    assert ("3 images were skipped at convert time (1 corrupt, 1 empty file, 1 not an image; see "
            f"{report})") in caplog.text


def test_converted_report_matches_the_planted_files(tree, converted):
    report = json.loads((converted / "convert_report.json").read_text())
    assert {p: r.split(":")[0] for p, r in report["skipped"]} == BAD
    assert report["reencoded"] == {"mode CMYK": 1} and report["num_samples"] == GOOD + 1


def test_ffcv_reports_what_convert_skipped(tree, converted, tmp_path, monkeypatch, caplog):
    pytest.importorskip("ffcv")
    with caplog.at_level(logging.INFO):
        summary, seen = _train(monkeypatch, tmp_path / "run", converted, "ffcv", 8)
    kept = [rel for rel in _scan(tree) if rel not in BAD]
    assert sorted(seen) == list(range(GOOD + 1)) and kept.index(CMYK) in seen, "CMYK re-encoded and trained on"
    _convert_skips_reported(summary, converted, caplog)
    assert _last_metrics(tmp_path / "run")["loader/convert_skipped"] == 3


def test_dali_shards_train_and_report_what_convert_skipped(tree, converted, tmp_path, monkeypatch, caplog):
    pytest.importorskip("nvidia.dali")
    with caplog.at_level(logging.INFO):
        summary, seen = _train(monkeypatch, tmp_path / "run", converted / "dali", "dali", 8, "data.dali.decoder=cpu",
                               "data.dali.num_threads=1")
    kept = [rel for rel in _scan(tree) if rel not in BAD]
    assert sorted(seen) == list(range(GOOD + 1)) and kept.index(CMYK) in seen, "CMYK re-encoded and trained on"
    _convert_skips_reported(summary, converted, caplog)


def test_crop_larger_than_the_stored_images_is_a_one_line_error(converted, tmp_path, capsys):
    pytest.importorskip("ffcv")
    overrides = tiny_overrides(tmp_path / "run", str(converted), "ffcv", batch=8)
    assert byol(["train", *overrides, "data.image_size=48"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "data.image_size=48" in err and "largest side 32 px" in err and "at most 32" in err
    assert str(converted / "ffcv" / "train.beton") in err and "--max-side" in err
