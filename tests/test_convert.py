"""`byol convert`: a small real-photo tree with broken files -> DALI shards + FFCV beton, read back and checked.

FFCV's first import costs 13-30 s of numba compilation, so the beton is written once (module fixture) and read back
with `ffcv.reader.Reader` plus plain JPEG decoding instead of a compiled `Loader`.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from byolfast.pipeline.convert import dataset as convert_mod
from byolfast.pipeline import storage
from byolfast.pipeline.backends.dali import format as dali_format
from byolfast.pipeline.backends.ffcv import format as ffcv_format
from byolfast.pipeline.contract import DataError
from byolfast.pipeline.convert import convert_dataset
from byolfast.pipeline.storage import skipped_at_convert
from byolfast.pipeline.convert.normalise import SkipImage, normalise_file
from byolfast.pipeline.backends.dali.format import load_manifest
from byolfast.pipeline.backends.ffcv.format import load_beton_meta

skimage_data = pytest.importorskip("skimage.data")
logger = logging.getLogger(__name__)

CLASSES = ["cat", "dog", "empty_class", "fish"]
BAD = {"cat/truncated.jpg": "corrupt", "cat/zero.jpg": "empty file", "dog/text.jpg": "not an image",
       "fish/tiny.jpg": "too small"}
REENCODED = {"dog/cmyk.jpg": "mode CMYK", "fish/png.png": "format PNG", "fish/gray.jpg": "mode L",
             "fish/big.jpg": "resize"}


def _photo_crop(photo: np.ndarray, k: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    h, w = photo.shape[:2]
    y, x = (k * 17) % (h // 3), (k * 29) % (w // 3)
    return Image.fromarray(photo[y:y + 2 * h // 3, x:x + 2 * w // 3]).resize(size, Image.Resampling.BICUBIC)


def make_tree(root: Path) -> None:
    """3 classes x 6 photo JPEGs (96x72), an empty class, and the bad / unusual files of BAD and REENCODED."""
    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee(), skimage_data.rocket()]
    for ci, cname in enumerate(("cat", "dog", "fish")):
        (root / cname).mkdir(parents=True)
        for k in range(6):
            _photo_crop(photos[(ci + k) % len(photos)], k).save(root / cname / f"{k}.jpg", quality=90)
    (root / "empty_class").mkdir()
    good = Image.open(root / "cat" / "0.jpg").convert("RGB")
    data = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (root / "cat" / "zero.jpg").write_bytes(b"")
    (root / "dog" / "text.jpg").write_text("not an image at all\n")
    good.convert("CMYK").save(root / "dog" / "cmyk.jpg", quality=90)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(root / "fish" / "tiny.jpg")
    good.save(root / "fish" / "png.png")
    Image.fromarray(skimage_data.camera()).resize((80, 80)).save(root / "fish" / "gray.jpg")
    Image.fromarray(skimage_data.astronaut()).save(root / "fish" / "big.jpg", quality=90)  # 512 px: resized to 256


def expected_kept(root: Path) -> list[tuple[str, int]]:
    """(relative path, label) of the samples that survive, in index order."""
    kept = []
    for ci, cname in enumerate(CLASSES):
        for p in sorted((root / cname).iterdir()):
            rel = f"{cname}/{p.name}"
            if rel not in BAD:
                kept.append((rel, ci))
    return kept


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    make_tree(root)
    return root


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    t0 = time.perf_counter()
    report = convert_dataset(str(tree), str(out), workers=2, shard_size=8, progress=False)
    logger.info("full conversion (incl. FFCV import): %.1f s", time.perf_counter() - t0)
    return report, out


def test_report_lists_exactly_the_bad_files(tree, converted):
    report, out = converted
    assert {p: r.split(":")[0] for p, r in report.skipped} == BAD
    assert report.num_candidates == 6 * 3 + len(BAD) + len(REENCODED)
    assert report.num_samples == len(expected_kept(tree)) == 6 * 3 + len(REENCODED)
    assert report.reencoded == {r: 1 for r in REENCODED.values()}
    assert report.passthrough == 18 and report.empty_classes == ["empty_class"] and report.classes == CLASSES
    on_disk = json.loads((out / "convert_report.json").read_text())
    assert on_disk["skipped"] == [list(s) for s in report.skipped]
    assert on_disk["outputs"]["dali"]["num_samples"] == on_disk["outputs"]["ffcv"]["num_samples"] == 22
    assert not (out / convert_mod.WORK).exists()
    assert "22 of 26 images" in report.summary()


def test_outputs_find_what_convert_skipped(tree, converted, tmp_path, caplog):
    report, out = converted
    expected = {"convert_skipped": 4, "convert_skip_reasons": {r: 1 for r in BAD.values()},
                "convert_report": str(out / convert_mod.REPORT)}
    assert skipped_at_convert(out / "ffcv" / "train.beton", 22) == expected
    assert skipped_at_convert(out / "dali", 22) == expected
    moved = tmp_path / "moved"  # a dataset copied elsewhere (a node's local disk) keeps its report
    shutil.copytree(out / "dali", moved / "dali")
    shutil.copy(out / convert_mod.REPORT, moved)
    assert skipped_at_convert(moved / "dali")["convert_report"] == str(moved / convert_mod.REPORT)
    assert skipped_at_convert(tree) == skipped_at_convert(tree / "cat") == {}  # a source tree has no report
    with caplog.at_level(logging.WARNING, logger="byolfast.pipeline.convert"):
        assert skipped_at_convert(out / "dali", 21) == {}
        assert "another conversion" in caplog.text
        (moved / convert_mod.REPORT).write_text("{")
        assert skipped_at_convert(moved / "dali") == {} and "unreadable" in caplog.text


def test_a_later_format_keeps_the_earlier_one_in_the_report(tree, converted, tmp_path):
    """`--format ffcv`, then `--format dali` into the same folder: the report lists both, so the beton's loader
    still finds what convert skipped."""
    _, out = converted
    later = tmp_path / "later"
    shutil.copytree(out / "ffcv", later / "ffcv")
    report = json.loads((out / convert_mod.REPORT).read_text())
    report.update(out=str(later), outputs={"ffcv": {**report["outputs"]["ffcv"],
                                                    "path": str(later / "ffcv" / "train.beton")}})
    (later / convert_mod.REPORT).write_text(json.dumps(report))   # as an ffcv-only run writes it
    convert_dataset(str(tree), str(later), formats=["dali"], workers=2, shard_size=8, progress=False)
    assert set(json.loads((later / convert_mod.REPORT).read_text())["outputs"]) == {"dali", "ffcv"}
    assert skipped_at_convert(later / "ffcv" / "train.beton", 22)["convert_skipped"] == 4
    assert skipped_at_convert(later / "dali", 22)["convert_skipped"] == 4
    # a rerun with nothing left to do keeps the other format in the report too
    convert_dataset(str(tree), str(later), formats=["dali"], workers=2, shard_size=8, progress=False)
    assert set(json.loads((later / convert_mod.REPORT).read_text())["outputs"]) == {"dali", "ffcv"}
    assert skipped_at_convert(later / "ffcv" / "train.beton", 22)["convert_skipped"] == 4


def _read_shards(manifest: dict) -> dict[int, dict]:
    samples: dict[int, dict] = {}
    for tar_path in manifest["tar_paths"]:
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(int(key), {})[ext] = tar.extractfile(m).read()
    return samples


def test_shards_hold_normalised_samples(tree, converted):
    _, out = converted
    manifest = load_manifest(out, verify=True)
    assert manifest["format"] == "byolfast-wds-v1" and manifest["classes"] == CLASSES
    assert [s["count"] for s in manifest["shards"]] == [8, 8, 6] and manifest["num_samples"] == 22
    samples = _read_shards(manifest)
    for i, (rel, label) in enumerate(expected_kept(tree)):
        s = samples[i]
        assert set(s) == {"jpg", "cls", "label", "index"}
        assert int(s["cls"]) == label == int.from_bytes(s["label"], "little", signed=True)
        assert int.from_bytes(s["index"], "little", signed=True) == i
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB"
        if rel in REENCODED:
            assert s["jpg"] != (tree / rel).read_bytes()
        else:
            assert s["jpg"] == (tree / rel).read_bytes()  # passed through byte for byte
    big = Image.open(io.BytesIO(samples[[r for r, _ in expected_kept(tree)].index("fish/big.jpg")]["jpg"]))
    assert big.size == (256, 256)
    cmyk_index = [r for r, _ in expected_kept(tree)].index("dog/cmyk.jpg")
    cmyk = np.asarray(Image.open(io.BytesIO(samples[cmyk_index]["jpg"])), dtype=float)
    assert np.abs(cmyk - np.asarray(Image.open(tree / "cat" / "0.jpg"), dtype=float)).mean() < 8  # colours kept


def test_shards_deal_the_samples_in_a_fixed_shuffled_order(tree, converted):
    # Index order is class order: shards in index order made the reader's batches few-class (its shuffle only mixes
    # the tars and a window of samples). Each shard must hold a spread of classes, in `shard_order`.
    _, out = converted
    manifest = load_manifest(out)
    keys = []
    for tar_path in manifest["tar_paths"]:
        with tarfile.open(tar_path) as tar:
            keys.append(list(dict.fromkeys(int(m.name.split(".")[0]) for m in tar.getmembers())))
    assert sum(keys, []) == storage.shard_order(22).tolist()
    labels = [label for _, label in expected_kept(tree)]
    assert all(len({labels[i] for i in shard}) >= 2 for shard in keys)
    assert storage.shard_order(22).tolist() == storage.shard_order(22).tolist() != list(range(22))


def test_index_files_match_wds2idx(converted, tmp_path):
    site = next(p for p in map(Path, sys.path) if (p / "wds2idx.py").is_file())  # shipped with the DALI wheel
    sys.path.insert(0, str(site))
    try:
        from wds2idx import IndexCreator
    finally:
        sys.path.remove(str(site))
    manifest = load_manifest(converted[1] / "dali")
    for tar, idx in zip(manifest["tar_paths"], manifest["index_paths"]):
        with IndexCreator(tar, str(tmp_path / "ref.idx"), verbose=False) as creator:
            creator.create_index()
        assert (tmp_path / "ref.idx").read_text() == Path(idx).read_text()


@pytest.mark.parametrize("with_index", [True, False])
def test_dali_webdataset_reader_reads_shards(tree, converted, with_index):
    from nvidia.dali import fn, pipeline_def, types
    manifest = load_manifest(converted[1])

    @pipeline_def(batch_size=6, num_threads=1, device_id=None)
    def pipe():
        jpg, label, index = fn.readers.webdataset(
            paths=manifest["tar_paths"], index_paths=manifest["index_paths"] if with_index else None,
            ext=["jpg", "label", "index"], dtypes=[types.UINT8, types.INT64, types.INT64], name="Reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), label, index

    p = pipe()
    p.build()
    assert p.epoch_size("Reader") == 22
    got = {}
    for _ in range(4):
        images, labels, indices = p.run()
        for k in range(len(labels)):
            got[int(np.asarray(indices[k])[0])] = (int(np.asarray(labels[k])[0]), np.asarray(images[k]).shape)
    kept = expected_kept(tree)
    assert sorted(got) == list(range(22))
    assert [got[i][0] for i in range(22)] == [y for _, y in kept]
    assert all(shape[2] == 3 for _, shape in got.values())
    assert got[[r for r, _ in kept].index("fish/big.jpg")][1] == (256, 256, 3)


def test_manifest_reports_damage(converted, tmp_path):
    folder = tmp_path / "dali"
    shutil.copytree(converted[1] / "dali", folder)
    load_manifest(folder, verify=True)
    tar = folder / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes: only the checksum notices
    tar.write_bytes(bytes(data))
    load_manifest(folder)
    with pytest.raises(DataError, match="shard-000001.tar: sha256"):
        load_manifest(folder, verify=True)
    tar.write_bytes(bytes(data[:5000]))
    with pytest.raises(DataError, match=r"shard-000001.tar has 5000 bytes.*re-run `byol convert`"):
        load_manifest(folder)
    tar.unlink()
    with pytest.raises(DataError, match="shard-000001.tar is missing"):
        load_manifest(folder)
    shutil.copy(converted[1] / "dali" / "shard-000001.tar", tar)
    idx = folder / "shard-000001.idx"
    good_idx = idx.read_text()
    idx.write_text("".join(good_idx.splitlines(keepends=True)[:-2]))   # the last sample's line cut off
    with pytest.raises(DataError, match=r"shard-000001.idx lists \d+ of its \d+ samples \(truncated\)"):
        load_manifest(folder)
    idx.write_text(good_idx)
    manifest = json.loads((folder / "manifest.json").read_text())
    broken = {**manifest, "shards": [{"tar": s["tar"]} for s in manifest["shards"]]}
    (folder / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(DataError, match="a shard entry lacks"):
        load_manifest(folder)
    manifest["num_samples"] = 23
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="not num_samples=23"):
        load_manifest(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        load_manifest(folder)


def test_beton_reads_back(tree, converted):
    from ffcv.reader import Reader
    from ffcv import types as ffcv_types
    assert (ffcv_types.HeaderType, ffcv_types.FieldDescType, ffcv_types.ALLOC_TABLE_TYPE) == (
        ffcv_format.HEADER_TYPE, ffcv_format.FIELD_DESC_TYPE, ffcv_format.ALLOC_TABLE_TYPE)
    path = converted[1] / "ffcv" / "train.beton"
    meta = load_beton_meta(path)
    assert meta["num_samples"] == 22 and meta["fields"] == ["image", "label", "index"] and meta["classes"] == CLASSES
    reader = Reader(str(path))
    image_meta, labels, indices = (reader.metadata[f"f{i}"] for i in range(3))
    kept = expected_kept(tree)
    # stored in the shards' shuffled order, each sample with its global index and its label
    assert list(indices) == storage.shard_order(22).tolist()
    assert list(labels) == [kept[i][1] for i in indices]
    assert json.loads((path.parent / ffcv_format.META).read_text())["order"] == "shuffled"
    shards = _read_shards(load_manifest(converted[1]))
    raw = path.read_bytes()
    for row in reader.alloc_table:
        p = int(row["sample_id"])   # the position in the beton
        i = int(indices[p])
        jpg = raw[int(row["ptr"]):int(row["ptr"]) + int(row["size"])]  # write_mode jpg: FFCV's own JPEG
        ffcv_img = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=float)
        dali_img = np.asarray(Image.open(io.BytesIO(shards[i]["jpg"])).convert("RGB"), dtype=float)
        assert ffcv_img.shape == dali_img.shape == (image_meta["height"][p], image_meta["width"][p], 3)
        assert np.abs(ffcv_img - dali_img).mean() < 4  # the same image, re-encoded once more by FFCV


def test_truncated_or_unfinished_beton_is_reported(converted, tmp_path):
    src = converted[1] / "ffcv" / "train.beton"
    size = src.stat().st_size
    for cut in (10, 5000, size - 30, size - 24 * 5):
        bad = tmp_path / "train.beton"
        shutil.copy(src, bad)
        with open(bad, "r+b") as f:
            f.truncate(cut)
        with pytest.raises(DataError, match="truncated|allocated"):
            load_beton_meta(bad)
    unfinished = bytearray(src.read_bytes())
    unfinished[16:24] = bytes(8)  # alloc_table_ptr is written last by FFCV's writer
    (tmp_path / "train.beton").write_bytes(bytes(unfinished))
    with pytest.raises(DataError, match="unfinished"):
        load_beton_meta(tmp_path / "train.beton")
    with pytest.raises(DataError, match="does not exist"):
        load_beton_meta(tmp_path / "nope.beton")


def test_second_run_says_complete_and_rejects_other_settings(tree, converted, caplog):
    _, out = converted
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".tar", ".beton")}
    with caplog.at_level(logging.INFO, logger="byolfast.pipeline.convert"):
        again = convert_dataset(str(tree), str(out), workers=2, shard_size=8, progress=False)
    assert "output complete" in caplog.text
    assert {f: o["status"] for f, o in again.outputs.items()} == {"ffcv": "complete", "dali": "complete"}
    assert {p: r.split(":")[0] for p, r in again.skipped} == BAD  # carried over from the first report
    assert before == {p: p.stat().st_mtime_ns for p in before}
    with pytest.raises(DataError, match="overwrite"):
        convert_dataset(str(tree), str(out), formats=["dali"], max_side=128, shard_size=8, progress=False)
    with pytest.raises(DataError, match="overwrite"):
        convert_dataset(str(tree), str(out), formats=["ffcv"], jpeg_quality=80, progress=False)


def test_a_class_ordered_beton_of_an_earlier_convert_asks_for_overwrite(tree, converted, tmp_path):
    """A beton written before the shuffled order (its settings have no "order") is not taken for a complete one."""
    out = tmp_path / "out"
    shutil.copytree(converted[1] / "ffcv", out / "ffcv")
    meta_path = out / "ffcv" / ffcv_format.META
    meta = json.loads(meta_path.read_text())
    del meta["settings"]["order"], meta["order"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"class order \(written by an earlier byol convert\).*--overwrite"):
        convert_dataset(str(tree), str(out), formats=["ffcv"], workers=2, shard_size=8, progress=False)


_WRITE_SHARD = dali_format._write_shard_task  # captured before any test patches it


def _fail_on_shard_2(task):
    if task[1] == 2:  # leave a half-written temporary file behind, as a killed worker would
        (Path(task[0]) / "shard-000002.tar.tmp").write_bytes(b"partial")
        raise RuntimeError("interrupted")
    return _WRITE_SHARD(task)


def test_interrupted_dali_run_resumes(tree, converted, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(dali_format, "_write_shard_task", _fail_on_shard_2)  # forked workers inherit the patch
    with pytest.raises(RuntimeError, match="interrupted"):
        convert_dataset(str(tree), str(out), formats=["dali"], workers=1, shard_size=8, progress=False)
    monkeypatch.undo()
    folder = out / "dali"
    assert not (folder / "manifest.json").exists() and (folder / "shard-000002.tar.tmp").exists()
    with pytest.raises(DataError, match="no manifest.json"):
        load_manifest(folder)
    (folder / "shard-000002.tar").write_bytes(b"a tar with no progress record is not done")
    done_before = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-00000[01].*")}
    t0 = time.perf_counter()
    report = convert_dataset(str(tree), str(out), formats=["dali"], workers=2, shard_size=8, progress=False)
    seconds = time.perf_counter() - t0
    assert report.outputs["dali"]["status"] == "resumed"
    assert done_before == {n: (folder / n).stat().st_mtime_ns for n in done_before}  # shards 0 and 1 kept
    assert not list(folder.glob("*.tmp")) and not (folder / dali_format.PROGRESS).exists()
    resumed = load_manifest(folder, verify=True)
    assert resumed["shards"] == load_manifest(converted[1])["shards"]  # byte-identical to an uninterrupted run
    logger.info("resumed DALI conversion: %d images in %.2f s", report.num_candidates, seconds)


def _killed_on_shard_1(task):
    if task[1] == 1:   # as the kernel's out-of-memory killer would
        os.kill(os.getpid(), signal.SIGKILL)
    return _WRITE_SHARD(task)


def test_a_killed_worker_is_an_error_not_a_hang(tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(dali_format, "_write_shard_task", _killed_on_shard_1)
    with pytest.raises(DataError, match="worker process died.*run the same command again"):
        convert_dataset(str(tree), str(out), formats=["dali"], workers=2, shard_size=8, progress=False)
    monkeypatch.undo()
    report = convert_dataset(str(tree), str(out), formats=["dali"], workers=2, shard_size=8, progress=False)
    assert report.outputs["dali"]["num_samples"] == 22


def test_dali_only_conversion_speed(tree, tmp_path):
    t0 = time.perf_counter()
    report = convert_dataset(str(tree), str(tmp_path / "out"), formats=["dali"], workers=2, shard_size=8,
                             progress=False)
    seconds = time.perf_counter() - t0
    logger.info("DALI-only conversion: %d images, %.2f s, %.0f images/s (2 workers)", report.num_candidates,
                seconds, report.num_candidates / seconds)
    assert report.outputs == {"dali": report.outputs["dali"]} and report.num_samples == 22


def test_file_list_input(tree, tmp_path):
    lines = ["# path label", "dog/1.jpg\tdog", "cat/0.jpg cat", "cat/zero.jpg\tcat", "fish/missing.jpg fish",
             "fish/png.png\tfish", ""]
    (tmp_path / "list.txt").write_text("\n".join(lines))
    report = convert_dataset(str(tree), str(tmp_path / "out"), formats=["dali"], file_list=str(tmp_path / "list.txt"),
                             workers=1, progress=False)
    assert report.classes == ["cat", "dog", "fish"] and report.num_samples == 3
    assert dict(report.skipped) == {"cat/zero.jpg": "empty file: 0 bytes", "fish/missing.jpg": "missing: no such file"}
    shards = _read_shards(load_manifest(tmp_path / "out"))
    assert [int(shards[i]["cls"]) for i in range(3)] == [0, 1, 2]
    assert shards[0]["jpg"] == (tree / "cat" / "0.jpg").read_bytes()

    (tmp_path / "ints.txt").write_text("cat/0.jpg 3\ndog/0.jpg 1\n")
    samples, classes = convert_mod.list_samples(tree, str(tmp_path / "ints.txt"))
    assert classes == ["0", "1", "2", "3"] and [y for _, y in samples] == [1, 3]
    (tmp_path / "padded.txt").write_text("cat/0.jpg 01\ndog/0.jpg 2\n")      # "01" is class 1
    samples, classes = convert_mod.list_samples(tree, str(tmp_path / "padded.txt"))
    assert classes == ["0", "1", "2"] and [y for _, y in samples] == [1, 2]
    (tmp_path / "mixed.txt").write_text("cat/0.jpg 01\ndog/0.jpg cat\nfish/png.png \u00b2\n")   # names, sorted
    samples, classes = convert_mod.list_samples(tree, str(tmp_path / "mixed.txt"))
    assert classes == ["01", "cat", "\u00b2"] and sorted(y for _, y in samples) == [0, 1, 2]
    (tmp_path / "bad.txt").write_text("cat/0.jpg 1\njustonefield\n")
    with pytest.raises(DataError, match="bad.txt:2"):
        convert_mod.list_samples(tree, str(tmp_path / "bad.txt"))
    (tmp_path / "dup.txt").write_text("cat/0.jpg 1\ncat/0.jpg 2\n")
    with pytest.raises(DataError, match="listed twice"):
        convert_mod.list_samples(tree, str(tmp_path / "dup.txt"))


def test_bad_arguments(tree, tmp_path):
    with pytest.raises(DataError, match="inside the source"):
        convert_dataset(str(tree), str(tree / "out"), formats=["dali"], progress=False)
    with pytest.raises(DataError, match="formats"):
        convert_dataset(str(tree), str(tmp_path), formats=["tfrecord"], progress=False)
    with pytest.raises(DataError, match="does not exist"):
        convert_dataset(str(tmp_path / "nothing"), str(tmp_path / "out"), formats=["dali"], progress=False)


def test_normalise_unusual_images(tmp_path, monkeypatch):
    photo = _photo_crop(skimage_data.chelsea(), 0, (120, 80))
    photo.save(tmp_path / "progressive.jpg", progressive=True, quality=90)
    assert normalise_file(str(tmp_path / "progressive.jpg"), 256, 90)[0] is None  # nvJPEG reads progressive
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    photo.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=90)
    data, reason, _, size = normalise_file(str(tmp_path / "rotated.jpg"), 256, 90)
    assert reason == "exif orientation" and size == (80, 120) == Image.open(io.BytesIO(data)).size
    gray16 = np.asarray(photo.convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray16).save(tmp_path / "gray16.png")
    data, reason, _, _ = normalise_file(str(tmp_path / "gray16.png"), 256, 90)
    decoded = np.asarray(Image.open(io.BytesIO(data)), dtype=float)
    assert reason == "format PNG" and decoded.shape == (80, 120, 3)
    assert abs(decoded.mean() - np.asarray(photo.convert("L")).mean()) < 2  # scaled down, not clipped at 255
    photo.convert("RGBA").save(tmp_path / "alpha.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png", transparency=0)
    for name in ("alpha.png", "palette.png"):
        data, _, _, _ = normalise_file(str(tmp_path / name), 256, 90)
        assert Image.open(io.BytesIO(data)).mode == "RGB"
    Image.fromarray(skimage_data.astronaut()).save(tmp_path / "huge.jpg")  # 512 x 512
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 512 // 2 - 1)  # over twice the limit: skipped
    with pytest.raises(SkipImage, match="huge"):
        normalise_file(str(tmp_path / "huge.jpg"), 64, 90)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 512 - 1)  # between 1x and 2x: decoded small, kept
    data, reason, _, size = normalise_file(str(tmp_path / "huge.jpg"), 64, 90)
    assert reason == "resize" and size == (64, 64)
    Image.new("RGB", (4000, 20)).save(tmp_path / "strip.jpg")
    with pytest.raises(SkipImage, match="too small"):
        normalise_file(str(tmp_path / "strip.jpg"), 256, 90)
    assert normalise_file(str(tmp_path / "huge.jpg"), 0, 90)[0] is None  # max_side 0 keeps the size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 512 * 4)
    Image.new("L", (70000, 10), 128).save(tmp_path / "wide.png")   # wider than a JPEG can store
    with pytest.raises(SkipImage, match="cannot be re-encoded"):
        normalise_file(str(tmp_path / "wide.png"), 0, 90)


@pytest.mark.parametrize("own_sigint_handler", [False, True])
def test_ffcv_writer_failure_is_an_error_not_a_hang(tree, converted, tmp_path, own_sigint_handler):
    """A failing writer process stops the write with the sample named, also when the caller has its own SIGINT
    handler (the watcher stops FFCV's polling loop with an interrupt, which such a handler would take)."""
    good = tree / "cat" / "0.jpg"
    refs = [(str(good), 0, good.stat().st_size, 0)] * 4 + [(str(good), 0, 10 ** 9, 0)]  # the last cannot be read
    mine = signal.signal(signal.SIGINT, lambda signum, frame: None) if own_sigint_handler else None
    try:
        with pytest.raises(DataError, match="sample 4"):
            ffcv_format.write_beton(tmp_path, refs, ["a"], max_side=64, jpeg_quality=90, write_mode="jpg",
                                    workers=1, max_image_bytes=64 * 64 * 3, total_bytes=10 ** 6, settings={},
                                    progress=False)
        assert not list(tmp_path.iterdir())
        if own_sigint_handler:
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "the caller's handler is back"
    finally:
        if mine is not None:
            signal.signal(signal.SIGINT, mine)


def test_damaged_output_is_repaired(tree, converted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(converted[1], out)
    good_shards = load_manifest(out)["shards"]
    (out / "dali" / "shard-000001.tar").write_bytes(b"cut short")
    beton = out / "ffcv" / "train.beton"
    with open(beton, "r+b") as f:
        f.truncate(beton.stat().st_size - 100)
    (out / "ffcv" / "train.beton.tmp").write_bytes(b"left by an interrupted run")
    report = convert_dataset(str(tree), str(out), workers=2, shard_size=8, progress=False)
    assert report.outputs["dali"]["status"] == "resumed" and report.outputs["ffcv"]["status"] == "written"
    assert load_manifest(out, verify=True)["shards"] == good_shards
    assert load_beton_meta(beton)["num_samples"] == 22 and not (out / "ffcv" / "train.beton.tmp").exists()
