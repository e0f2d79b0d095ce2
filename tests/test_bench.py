"""`byol bench` / `byol profile`: the bottleneck logic, the JSON the commands write, and the profiler trace.

Model sizes are tiny (ResNet-18 at 16 px, batch 4, narrow heads, fp32, one torch thread) so the whole file runs in
about a minute on two shared cores.
"""
from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from byolfast.benchmarks import bench, common
from byolfast.benchmarks.report import (RunFacts, build_report, classify, format_table, hidden_ratio, render_text,
                                        stage_shares, summary_lines)
from byolfast.pipeline.config import DaliConfig, DataConfig

TINY = ["model.arch=resnet18", "data.image_size=16", "train.batch_size=4", "model.projector_hidden=32",
        "model.predictor_hidden=32", "model.projector_out=16", "train.precision=fp32", "train.num_threads=1",
        "data.num_workers=0"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# --- the report's logic ------------------------------------------------------------------------------------------
def _timed_steps(loader_s: float, model_s: float, steps: int = 3) -> dict[str, float]:
    """Stage times of a loop whose loader sleeps `loader_s` and whose model sleeps `model_s` per step."""
    from byolfast.benchmarks.profile import StageTimer

    timer = StageTimer(torch.device("cpu"))
    for _ in range(steps):
        with timer("data_wait"):
            time.sleep(loader_s)
        with timer("forward_online"):
            time.sleep(model_s / 2)
        with timer("backward"):
            time.sleep(model_s / 2)
    return dict(timer.seconds)


def test_slow_loader_is_input_bound_with_loader_advice():
    facts = RunFacts(data=DataConfig(backend="torch", num_workers=1), cpu_count=8, image_size=224, stored_max_side=500)
    report = build_report(_timed_steps(0.03, 0.003), 3, facts, {"bad_images": 0})
    assert report["bound"] == "input-bound"
    assert report["data_wait_share"] > 0.5
    advice = " ".join(report["advice"])
    assert "data.backend=dali" in advice and "data.num_workers" in advice and "--max-side" in advice
    text = render_text(report)
    assert "input-bound" in text and "data_wait" in text and "bad_images=0" in text
    assert report["summary"].startswith("input-bound")


def test_slow_model_is_compute_bound_with_model_advice():
    facts = RunFacts(device_type="cuda", data=DataConfig(backend="dali"), precision="fp32", channels_last=False,
                     compile=False,
                     batch_size=128, peak_mem_mb=10_000, total_mem_mb=80_000)
    report = build_report(_timed_steps(0.0005, 0.03), 3, facts)
    assert report["bound"] == "compute-bound"
    advice = " ".join(report["advice"])
    for expected in ("train.precision=bf16", "model.channels_last=true", "train.compile=true",
                     "train.batch_size=256"):
        assert expected in advice
    assert set(report["stage_shares"]) >= {"data_wait", "forward_online", "backward", "ema", "optimizer"}
    assert sum(report["stage_shares"].values()) == pytest.approx(1.0)
    # with 8 ranks of 128 the suggestion is for the global train.batch_size
    ddp = build_report(_timed_steps(0.0005, 0.03), 3, dataclasses.replace(facts, world_size=8))
    assert "train.batch_size=2048 (256 per device)" in " ".join(ddp["advice"])


@pytest.mark.parametrize("facts, expected", [
    (RunFacts(device_type="cuda", cpu_count=16,
              data=DataConfig(backend="dali", dali=DaliConfig(num_threads=2, decoder="cpu"))),
     ["data.dali.decoder=mixed", "data.dali.num_threads"]),
    (RunFacts(data=DataConfig(backend="ffcv", num_workers=2), cpu_count=16), ["data.num_workers"]),
])
def test_input_advice_per_backend(facts, expected):
    advice = " ".join(build_report({"data_wait": 1.0, "backward": 1.0}, 1, facts)["advice"])
    assert all(e in advice for e in expected)


def test_fully_tuned_compute_bound_run_says_scale_out():
    facts = RunFacts(precision="bf16", channels_last=True, compile=True)
    report = build_report({"data_wait": 0.0, "forward_online": 1.0, "backward": 2.0}, 1, facts, mfu=0.42)
    assert report["bound"] == "compute-bound" and "add devices" in report["advice"][0] and "42%" in report["advice"][0]


def test_pure_helpers():
    assert classify(stage_shares({"data_wait": 1.0, "backward": 9.0})) == "compute-bound"
    assert classify(stage_shares({"data_wait": 2.0, "backward": 8.0})) == "input-bound"
    assert stage_shares({"a": 0.0}) == {"a": 0.0}
    assert hidden_ratio(90.0, 100.0) == pytest.approx(0.9) and hidden_ratio(1.0, 0.0) is None
    ema_heavy = build_report({"forward_online": 1.0, "ema": 0.5}, 1, RunFacts(ema="loop", compile=True))
    assert any("ema_update_" in tip for tip in ema_heavy["advice"])


# --- timing and output helpers -----------------------------------------------------------------------------------
class _ListLoader:
    def __init__(self, n: int):
        self.n, self.epochs = n, []

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return (i for i in range(self.n))


def test_host_time_per_call():
    calls = []
    secs = common.host_seconds_per_call(lambda: (calls.append(1), time.sleep(0.01)), torch.device("cpu"), 3)
    assert len(calls) == 3 and 0.01 <= secs < 0.5


def test_time_epochs_warms_up_and_times_each_repeat():
    from byolfast.benchmarks.common import time_epochs
    from byolfast.pipeline.contract import DataError

    seen = []
    loader = _ListLoader(6)
    secs, first = time_epochs(loader, seen.append, torch.device("cpu"), warmup=2, steps=3, repeats=2)
    assert len(secs) == 2 and all(s >= 0 for s in secs) and first >= 0
    assert seen == [0, 1, 2, 3, 4] * 2 and loader.epochs == [0, 1]
    slow = _ListLoader(8)
    secs, _ = time_epochs(slow, lambda b: time.sleep(0.05), torch.device("cpu"), warmup=2, steps=5, repeats=3,
                          budget_s=0.12)
    assert len(secs) == 1 and slow.epochs == [0]   # 2 affordable batches: one repeat of two
    seen.clear()
    secs, _ = time_epochs(_ListLoader(6), seen.append, torch.device("cpu"), warmup=2, steps=3, repeats=2,
                          budget_s=60.0)
    assert len(secs) == 2 and seen == [0, 1, 2, 3, 4] * 2   # a budget that does not bind keeps every warm-up
    with pytest.raises(DataError, match="warm-up"):
        time_epochs(_ListLoader(2), seen.append, torch.device("cpu"), warmup=2, steps=3, repeats=1)


class _ReadAheadLoader(_ListLoader):
    """The first `read_ahead` batches were prepared before the consumer came (a prefetch queue); later ones take
    20 ms each."""
    read_ahead = 4

    def __iter__(self):
        for i in range(self.n):
            if i >= self.read_ahead:
                time.sleep(0.02)
            yield i


def test_time_epochs_does_not_time_the_read_ahead():
    from byolfast.benchmarks.common import time_epochs

    seen = []
    secs, _ = time_epochs(_ReadAheadLoader(10), seen.append, torch.device("cpu"), warmup=1, steps=3, repeats=1)
    assert seen == list(range(8)) and secs[0] >= 0.018   # 1 + 4 untimed, then three 20 ms batches


def test_bench_images_are_real_photo_crops_and_cached(tmp_path):
    from PIL import Image

    from byolfast.benchmarks.bench_data import PHOTO_SIZE, build_bench_images

    folder = build_bench_images(tmp_path, 6)
    files = sorted(folder.glob("*/*.jpg"))
    assert len(files) == 6 and len({f.parent.name for f in files}) > 1
    for f in files:
        with Image.open(f) as img:
            assert img.format == "JPEG" and sorted(img.size) == sorted(PHOTO_SIZE)
    stamp = files[0].stat().st_mtime_ns
    assert build_bench_images(tmp_path, 6) == folder and files[0].stat().st_mtime_ns == stamp


def test_defaults_yield_to_the_config_file_and_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\n  arch: resnet34\n")
    defaults = ["model.arch=resnet18", "data.image_size=64", "train.batch_size=32"]
    cfg = common.load_bench_config(str(preset), ["train.batch_size=8"], defaults)
    assert (cfg.model.arch, cfg.data.image_size, cfg.train.batch_size) == ("resnet34", 64, 8)


def test_table_and_chart(tmp_path):
    records = [{"what": "loader", "backend": "torch", "device": "cpu", "batch_size": 4, "resolution": 16,
                "images_per_sec": 120.0, "peak_mem_mb": 10.0},
               {"what": "loader", "backend": "dali", "device": "cpu", "error": "ImportError: no DALI"},
               {"what": "ema", "variant": "fused", "device": "cpu", "ms_per_update": 2.5, "peak_mem_mb": None}]
    table = format_table(records)
    assert "torch" in table and "ImportError" in table and "ms/update" in table
    records += [{"what": "e2e", "backend": "torch", "ratio_to_model": 0.5},
                {"what": "ema", "variant": "loop", "ms_per_update": 5.0, "ratio_to_fused": 2.0},
                {"what": "ema", "variant": "bound", "ms_per_update": 2.0}]
    records[2].update(ratio_to_bound=1.25, num_values=33_000_000)
    lines = summary_lines(records)
    assert "costs 50%" in lines[0] and "1.25x the bandwidth bound" in lines[1] and "2.00x fused" in lines[1]
    assert len(lines) == 2   # no launch-side line without a host time (the CPU)
    records[2]["host_ms_per_update"] = 2.4
    assert summary_lines(records)[2] == "ema: fused issues in 2.400 ms on the host: bound by the host's launches"
    records[2]["host_ms_per_update"] = 0.4
    assert summary_lines(records)[2].endswith("bound by the device")
    del records[2]["host_ms_per_update"]
    records.append({"what": "loader", "backend": "ffcv", "images_per_sec": 300.0})
    assert summary_lines(records)[0] == "loader ffcv: 2.50x the torch baseline (300 vs 120 images/s)"
    png = common.write_bar_chart(tmp_path / "c.png", records, "t")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


# --- the commands --------------------------------------------------------------------------------------------------
def test_bench_model_json_schema(tmp_path):
    from byolfast.benchmarks.bench import main

    out = tmp_path / "model.json"
    assert main(["--what", "model", "--out", str(out), "--repeats", "1", "--warmup", "1", "--steps", "2",
                 "--matmul-size", "128", "--variants", "default,ema", *TINY]) == 0
    data = json.loads(out.read_text())
    env = data["env"]
    for key in ("device_name", "cuda", "torch", "dali", "ffcv", "cpu_count", "arch", "dtype", "num_workers",
                "matmul_tflops"):
        assert key in env, key
    recs = data["records"]
    assert [r["variant"] for r in recs] == ["fp32+channels_last", "fp32+channels_last+ema_loop"]
    for r in recs:
        assert r["what"] == "model" and r["device"] == "cpu" and "error" not in r
        assert (r["batch_size"], r["resolution"]) == (4, 16)
        assert r["images_per_sec"] > 0 and r["peak_mem_mb"] > 0 and r["flops_per_image"] > 0
        assert 0 < r["fraction_of_peak_matmul"]
        # of the bf16 rate only where bf16 is native: an emulated one (slower than fp32) would give over 100 %
        rates = env["matmul_tflops"]
        assert (r["mfu_bf16"] is None) if rates["bf16"] < rates["fp32"] else (r["mfu_bf16"] > 0)
    assert recs[0]["default"] and recs[1]["ema"] == "loop"
    assert out.with_suffix(".png").is_file()


def test_bench_ema_json_schema(tmp_path):
    from byolfast.benchmarks.bench import main

    out = tmp_path / "ema.json"
    assert main(["--what", "ema", "--out", str(out), "--repeats", "1", "--ema-iters", "2", *TINY]) == 0
    recs = {r["variant"]: r for r in json.loads(out.read_text())["records"]}
    assert set(recs) == {"fused", "loop", "bound"}
    for r in recs.values():
        assert r["what"] == "ema" and r["ms_per_update"] > 0 and r["num_values"] > 10_000_000   # ResNet-18 + head
        assert "peak_mem_mb" in r and "batch_size" in r and "resolution" in r and "images_per_sec" in r
    assert recs["loop"]["ratio_to_fused"] > 0 and recs["fused"]["ratio_to_bound"] > 0
    bound = recs["bound"]   # parameters: read twice, written once; BatchNorm buffers: copied
    assert bound["buffer_bytes"] > 0 and bound["bytes_moved"] == 3 * 4 * bound["num_values"] + 2 * bound["buffer_bytes"]


def _tiny_trainer(tmp_path):
    from byolfast.train.config import load_config
    from byolfast.train.loop import Trainer

    return Trainer(load_config(None, [*TINY, "data.backend=synthetic", "data.synthetic_size=16",
                                      f"train.out_dir={tmp_path}"]))


def test_profiled_step_is_the_trainers_step(tmp_path):
    """The profiler's stage-by-stage forward, timed, gives the trainer's step exactly; the loop EMA nearly."""
    from byolfast.benchmarks.profile import SplitForward, StageTimer

    whole, split, loop = (_tiny_trainer(tmp_path / name) for name in ("whole", "split", "loop"))
    whole.loader.set_epoch(0)
    batch = next(iter(whole.loader))
    names = []

    def record(name: str):
        names.append(name)
        return StageTimer(whole.device)(name)

    for step in range(2):
        a = whole.train_step(batch, step)
        b = split.train_step(batch, step, stage=record, forward=SplitForward(split.model, record))
        loop.train_step(batch, step, ema="loop")
        assert torch.equal(a.loss, b.loss) and torch.equal(a.grad_norm, b.grad_norm) and (a.lr, a.tau) == (b.lr, b.tau)
    assert names[:6] == ["forward_online", "forward_target", "loss", "backward", "optimizer", "ema"]
    for (k, v), w, u in zip(whole.model.state_dict().items(), split.model.state_dict().values(),
                            loop.model.state_dict().values()):
        assert torch.equal(v, w), k
        assert torch.allclose(v.float(), u.float(), atol=1e-6), k
    with pytest.raises(ValueError, match="ema"):
        whole.train_step(batch, 2, ema="slow")


def test_profile_writes_trace_and_report(tmp_path):
    from byolfast.benchmarks.profile import main

    out = tmp_path / "prof"
    assert main(["--steps", "1", "--wait", "0", "--warmup", "1", "--out", str(out), "data.backend=synthetic",
                 "data.synthetic_size=16", *TINY]) == 0
    assert list(out.glob("*.pt.trace.json"))
    trace = json.loads(next(out.glob("*.pt.trace.json")).read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"data_wait", "forward_online", "forward_target", "loss", "backward", "optimizer", "ema"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["bound"] in ("input-bound", "compute-bound") and report["advice"]
    assert report["stage_ms_per_step"]["backward"] > 0
    assert "Verdict" in (out / "report.txt").read_text()


def test_no_bf16_advice_on_a_cpu_without_bf16_units():
    facts = RunFacts(device_type="cpu", precision="fp32", cpu_bf16=False)
    advice = " ".join(build_report({"backward": 1.0}, 1, facts)["advice"])
    assert "bf16" not in advice and "train.compile=true" in advice


def test_bench_configs_stack_like_byol_train(tmp_path):
    """`--config base.yaml --config tuned.yaml` (byol tune's advice) means the same to bench/profile as to train."""
    base, tuned = tmp_path / "base.yaml", tmp_path / "tuned.yaml"
    base.write_text("train:\n  batch_size: 32\n  device: cpu\nmodel:\n  arch: resnet34\n")
    tuned.write_text("train:\n  batch_size: 16\ndata:\n  image_size: 48\n")
    cfg = common.load_bench_config([str(base), str(tuned)], ["data.num_workers=1"],
                                   ["data.image_size=64", "model.arch=resnet18", "train.epochs=20"])
    assert (cfg.train.batch_size, cfg.data.image_size, cfg.model.arch) == (16, 48, "resnet34")
    assert (cfg.data.num_workers, cfg.train.epochs) == (1, 20)     # overrides, then defaults of unset keys
    assert common.requested_device([], [str(base), str(tuned)]).type == "cpu"
    assert common.load_bench_config(str(tuned), [], []).train.batch_size == 16   # one file, as before


def test_bench_optim_json_schema(tmp_path):
    """`byol bench --what optim`: the fused LARS step and the per-tensor reference, timed side by side."""
    from byolfast.benchmarks.bench import main
    from byolfast.benchmarks.report import format_table

    out = tmp_path / "optim.json"
    assert main(["--what", "optim", "--out", str(out), "--repeats", "2", "--optim-iters", "1", *TINY]) == 0
    records = json.loads(out.read_text())["records"]
    assert [r["variant"] for r in records] == ["fused", "per_tensor"]
    for r in records:
        assert r["what"] == "optim" and r["ms_per_update"] > 0 and len(r["runs_ms"]) == 2
        assert r["arch"] == "resnet18" and r["num_tensors"] > 60 and r["num_values"] > 10_000_000   # ResNet-18 + heads
        assert r["images_per_sec"] is None and "peak_mem_mb" in r
    assert records[1]["ratio_to_fused"] > 0
    assert "ms/update" in format_table(records)


def test_photo_size_takes_width_x_height_and_names_the_option_when_wrong():
    import argparse

    from byolfast.benchmarks.bench_data import photo_size as _photo_size
    assert _photo_size("500x375") == (500, 375) and _photo_size("320X240") == (320, 240)
    for bad in ("500", "ax375", "0x10", "500x375x3"):
        with pytest.raises(argparse.ArgumentTypeError, match="--photo-size"):
            _photo_size(bad)


def test_the_peer_comparison_without_the_peer_says_how_to_install_it(tmp_path):
    from byolfast.benchmarks.peer_loader import main as peer_main
    with pytest.raises(SystemExit, match="pip install --no-deps --target"):
        peer_main(["--peer-path", str(tmp_path / "nothing"), "--data", str(tmp_path / "data")])


def test_overrides_may_follow_the_options():
    """`section.key=value` overrides before and after options (as the GPU suite's parts write them) all count."""
    args = bench.parse_args(["--data", "d", "train.batch_size=8", "--what", "e2e", "--backends", "ffcv",
                             "data.ffcv.augment_stream=true"])
    assert args.overrides == ["train.batch_size=8", "data.ffcv.augment_stream=true"]
    assert (args.what, args.data) == ("e2e", "d")
    assert bench.parse_args(["--", "--what", "ema", "model.arch=resnet18"]).overrides == ["model.arch=resnet18"]
