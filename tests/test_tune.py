"""`byol tune`: the search on a fake measurement (budget, slow and failing settings), the written YAML, several
`--config` files, and one small real run on the torch backend over tiny images (about 20 s on two shared cores)."""
from __future__ import annotations

import json
import time

import pytest
import torch
import yaml

from byolfast.benchmarks.tune_search import (NOISE, Tuner, TrialTimeout, cap_deferred, data_backends, hard_deadline,
                                             knobs, label)
from byolfast.train.cli import build_parser, config_file_overrides, load_configs
from byolfast.train.config import ConfigError, load_config


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def fake_measure(clock: FakeClock, loader_rate, e2e_cost: float = 20.0, loader_cost: float = 4.0,
                 slow_cost: dict | None = None, fails=lambda s: False, bound: str = "input-bound"):
    """A measurement that advances `clock` by its cost (a trial past its cap stops at the cap, as the hard deadline
    makes it) and reports `loader_rate(settings)`; training runs at a fifth of it, capped at 60 images/s."""
    calls = []

    def measure(kind: str, settings: dict, cap: float) -> dict:
        calls.append((kind, dict(settings), cap))
        cost = (slow_cost or {}).get(label(settings), e2e_cost if kind == "e2e" else loader_cost)
        clock.t += min(cost, cap)
        if cost > cap:
            raise TrialTimeout(f"stopped at its cap of {cap:.1f} s")
        if fails(settings):
            raise RuntimeError("decoder exploded")
        rate = loader_rate(settings)
        if kind == "loader":
            return {"images_per_sec": rate}
        e2e = min(60.0, rate / 5)
        return {"images_per_sec": e2e, "data_wait_share": 0.5 if bound == "input-bound" else 0.02,
                "report": {"bound": bound, "summary": f"{bound}: ...", "advice": ["a tip"]}}
    measure.calls = calls
    return measure


def base_config():
    return load_config(None, ["data.backend=torch", "data.num_workers=1"])


PRESET = {"data.backend": "torch", "data.num_workers": 1}


def dali_rate(settings: dict) -> float:
    """DALI is 3x torch; threads help up to 4; a deeper queue helps a little; torch workers help up to 2."""
    if settings["data.backend"] == "torch":
        return 100.0 * min(settings["data.num_workers"], 2)
    threads = settings["data.dali.num_threads"]
    return 300.0 * min(threads, 4) * (1.1 if settings.get("data.dali.prefetch_queue_depth", 2) >= 3 else 1.0)


# --- the search ----------------------------------------------------------------------------------------------------
def test_search_respects_the_budget_and_caps_every_trial():
    clock = FakeClock()
    stuck = {label({"data.backend": "torch", "data.num_workers": 8}): 10_000.0}   # this start never returns
    measure = fake_measure(clock, dali_rate, slow_cost=stuck)
    tuner = Tuner(measure, 120.0, cores=8, start=clock(), clock=clock)
    winner = tuner.run(PRESET, base_config(), ["torch", "dali"])
    assert clock.t - 1000.0 <= 120.0
    assert all(r["seconds"] <= r["cap_s"] + 1e-6 for r in tuner.trials)
    assert all(cap <= 120.0 * 0.2 + 1e-6 for _, _, cap in measure.calls)
    assert winner["data.backend"] == "dali"
    assert any(r.get("error", "").startswith("TrialTimeout") for r in tuner.trials)
    assert 5 <= len(tuner.trials) < 25   # the grid of DALI's CPU settings alone holds 9 x 2 x 5
    kinds = [r["kind"] for r in tuner.trials]
    assert kinds[0] == "e2e" and kinds.count("e2e") >= 2   # the verdict first, then a finalist trained with


@pytest.mark.parametrize("budget", [10.0, 30.0, 300.0])
def test_budget_holds_for_short_and_long_budgets(budget):
    clock = FakeClock()
    tuner = Tuner(fake_measure(clock, dali_rate), budget, cores=2, start=clock(), clock=clock)
    tuner.run(PRESET, base_config(), ["torch", "dali"])
    assert clock.t - 1000.0 <= budget


def test_a_deliberately_slow_setting_is_never_chosen():
    clock = FakeClock()

    def rate(settings: dict) -> float:   # three threads are deliberately slow; everything else is fast
        if settings.get("data.dali.num_threads") == 3:
            return 5.0
        return dali_rate(settings)

    tuner = Tuner(fake_measure(clock, rate), 120.0, cores=2, start=clock(), clock=clock)
    winner = tuner.run(PRESET, base_config(), ["torch", "dali"])
    assert winner.get("data.dali.num_threads") != 3
    assert any(r["settings"].get("data.dali.num_threads") == 3 for r in tuner.trials)   # it was tried
    assert tuner.rate("loader", winner) >= tuner.rate("loader", PRESET)


def test_a_slow_preset_is_replaced_and_a_setting_slower_than_the_preset_is_not():
    clock = FakeClock()
    tuner = Tuner(fake_measure(clock, dali_rate), 120.0, cores=2, start=clock(), clock=clock)
    # all within noise of the preset, or slower: the preset stays
    tuner.trials = [
        {"kind": "loader", "settings": PRESET, "images_per_sec": 100.0, "label": label(PRESET)},
        {"kind": "e2e", "settings": PRESET, "images_per_sec": 20.0, "label": label(PRESET)},
        {"kind": "loader", "settings": {**PRESET, "data.num_workers": 2}, "images_per_sec": 100.0 * (1 + NOISE / 2),
         "label": "w2"},
        {"kind": "loader", "settings": {**PRESET, "data.num_workers": 3}, "images_per_sec": 500.0, "label": "w3"},
        {"kind": "e2e", "settings": {**PRESET, "data.num_workers": 3}, "images_per_sec": 12.0, "label": "w3"},
    ]
    assert tuner.choose(PRESET) == PRESET
    # a faster loader that was never trained with does not win once other settings were, and trained slower
    tuner.trials.append({"kind": "loader", "settings": {**PRESET, "data.num_workers": 4}, "images_per_sec": 600.0,
                         "label": "w4"})
    assert tuner.choose(PRESET) == PRESET
    tuner.trials[1]["images_per_sec"] = 11.0   # now the preset trains slower than workers=3
    assert tuner.choose(PRESET) == {**PRESET, "data.num_workers": 3}


def test_training_trials_are_repeated_in_turn_and_their_median_decides():
    """A first training trial of the preset that ran slow (a busy neighbour) does not crown a setting whose training
    is slower than the preset's usual speed."""
    clock = FakeClock()
    preset_runs = iter([10.0, 30.0, 30.0, 30.0, 30.0, 30.0, 30.0, 30.0])

    def measure(kind: str, settings: dict, cap: float) -> dict:
        clock.t += min(10.0, cap)
        fast = settings != PRESET
        if kind == "loader":
            return {"images_per_sec": 300.0 if fast else 100.0}
        return {"images_per_sec": 25.0 if fast else next(preset_runs), "data_wait_share": 0.01,
                "report": {"bound": "compute-bound", "summary": "compute-bound: ...", "advice": []}}

    tuner = Tuner(measure, 300.0, cores=2, start=clock(), clock=clock)
    winner = tuner.run(PRESET, base_config(), ["torch"])
    assert winner == PRESET
    assert sum(r["kind"] == "e2e" and r["settings"] == PRESET for r in tuner.trials) >= 3
    assert tuner.rate("e2e", PRESET) == 30.0


def test_a_start_cut_at_its_cap_gets_one_more_try_with_twice_the_cap():
    clock = FakeClock()
    calls = {"dali": 0}

    def measure(kind: str, settings: dict, cap: float) -> dict:
        slow_first = settings["data.backend"] == "dali" and calls["dali"] == 0
        calls["dali"] += settings["data.backend"] == "dali"
        cost = 15.0 if slow_first else (20.0 if kind == "e2e" else 2.0)
        clock.t += min(cost, cap)
        if cost > cap:
            raise TrialTimeout("stopped at its cap")
        rate = dali_rate(settings)
        return {"images_per_sec": rate if kind == "loader" else rate / 10, "data_wait_share": 0.3,
                "report": {"bound": "input-bound", "summary": "input-bound: ...", "advice": []}}

    tuner = Tuner(measure, 120.0, cores=2, start=clock(), clock=clock)
    winner = tuner.run(PRESET, base_config(), ["torch", "dali"])
    first_dali = [r for r in tuner.trials if r["settings"]["data.backend"] == "dali"][:2]
    assert first_dali[0]["error"].startswith("TrialTimeout") and first_dali[1]["settings"] == first_dali[0]["settings"]
    assert first_dali[1]["images_per_sec"] and first_dali[1]["cap_s"] > first_dali[0]["cap_s"]
    assert winner["data.backend"] == "dali" and clock.t - 1000.0 <= 120.0


def test_no_time_for_any_trial_keeps_the_preset():
    clock = FakeClock()
    tuner = Tuner(fake_measure(clock, dali_rate), 10.0, cores=2, start=clock() - 60.0, clock=clock)
    assert tuner.run(PRESET, base_config(), ["torch", "dali"]) == PRESET and tuner.trials == []


def test_a_failing_setting_is_recorded_and_skipped():
    clock = FakeClock()
    measure = fake_measure(clock, dali_rate, fails=lambda s: s.get("data.dali.random_crop_decoder") is True)
    tuner = Tuner(measure, 120.0, cores=2, start=clock(), clock=clock)
    winner = tuner.run(PRESET, base_config(), ["torch", "dali"])
    failed = [r for r in tuner.trials if r.get("error")]
    assert failed and all(r["error"] == "RuntimeError: decoder exploded" for r in failed)
    assert "Traceback" in failed[0]["traceback"]
    assert winner["data.backend"] == "dali" and winner.get("data.dali.random_crop_decoder") is not True


def test_compute_bound_cpu_climbs_parallelism_down_first():
    clock = FakeClock()
    measure = fake_measure(clock, lambda s: 100.0 + s.get("data.num_workers", 0), bound="compute-bound")
    tuner = Tuner(measure, 120.0, cores=4, start=clock(), clock=clock)
    tuner.run({"data.backend": "torch", "data.num_workers": 4}, base_config(), ["torch"])
    loader_workers = [s["data.num_workers"] for kind, s, _ in measure.calls if kind == "loader"]
    assert loader_workers[:2] == [4, 3]


def test_hard_deadline_interrupts_a_stuck_trial():
    t0 = time.monotonic()
    with pytest.raises(TrialTimeout), hard_deadline(0.2):
        time.sleep(5)
    assert time.monotonic() - t0 < 2


def test_deferred_set_up_finishes_then_the_cap_fires_and_an_outer_timer_survives():
    import signal
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(time.monotonic()))
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.5)                 # an outer timer, as pytest-timeout's
        finished = []
        with pytest.raises(TrialTimeout), hard_deadline(0.1):
            with cap_deferred():                                  # e.g. a loader being built or closed
                time.sleep(0.4)
                finished.append(True)                             # not cut halfway
            time.sleep(5)                                         # never reached: the cap fires as the block ends
        assert finished == [True] and not fired
        assert 0.5 < signal.getitimer(signal.ITIMER_REAL)[0] < 1.2   # the outer timer goes on with what it had left
        time.sleep(1.3)
        assert len(fired) == 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_knobs_and_backends_for_the_data(tmp_path):
    assert [k.key for k in knobs("torch", "cpu", 2)] == ["data.num_workers"]
    dali_cpu = [k.key for k in knobs("dali", "cpu", 2)]
    assert dali_cpu[0] == "data.dali.num_threads" and "data.dali.decoder" not in dali_cpu
    assert {"data.dali.decoder", "data.dali.hw_decoder_load"} <= {k.key for k in knobs("dali", "cuda", 16)}
    assert [k.key for k in knobs("ffcv", "cpu", 2)] == ["data.num_workers", "data.ffcv.batches_ahead",
                                                        "data.ffcv.os_cache", "data.ffcv.order"]
    assert max(knobs("torch", "cpu", 2)[0].values) == 4
    (tmp_path / "folder" / "a").mkdir(parents=True)
    assert data_backends(str(tmp_path / "folder"), "torch")[:1] == ["torch"]
    (tmp_path / "conv" / "ffcv").mkdir(parents=True)
    (tmp_path / "conv" / "ffcv" / "train.beton").write_bytes(b"")
    assert "torch" not in data_backends(str(tmp_path / "conv"), "ffcv")
    assert data_backends("", "synthetic") == ["synthetic"]


# --- several --config files ----------------------------------------------------------------------------------------
def test_later_config_files_override_earlier_ones_then_overrides(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("data: {backend: torch, num_workers: 1, image_size: 32}\n"
                 "train: {batch_size: 64, weight_decay: 2.0e-6}\n")
    b.write_text("data:\n  num_workers: 2\n  dali: {num_threads: 3}\n"
                 "train: {weight_decay: 1.0e-6, out_dir: 'runs/#1 x'}\n")
    cfg = load_configs([str(a), str(b)], ["data.dali.num_threads=5"])
    assert (cfg.data.backend, cfg.data.num_workers, cfg.data.image_size) == ("torch", 2, 32)
    assert (cfg.data.dali.num_threads, cfg.data.dali.decoder) == (5, "mixed")
    assert (cfg.train.batch_size, cfg.train.weight_decay, cfg.train.out_dir) == (64, 1e-6, "runs/#1 x")
    assert build_parser().parse_args(["train", "--config", str(a), "--config", str(b), "x.y=1"]).config == [str(a),
                                                                                                             str(b)]
    b.write_text("data: {num_wokers: 2}\n")
    with pytest.raises(ConfigError, match="num_wokers"):
        load_configs([str(a), str(b)])
    with pytest.raises(ConfigError, match="not found"):
        config_file_overrides(str(tmp_path / "missing.yaml"))


# --- one real run --------------------------------------------------------------------------------------------------
def test_real_tune_on_tiny_images_writes_a_valid_override(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from byolfast.benchmarks.tune import main

    rng = np.random.default_rng(0)
    for i in range(64):
        folder = tmp_path / "images" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "data": {"backend": "torch", "path": str(tmp_path / "images"), "image_size": 16, "num_workers": 1},
        "model": {"arch": "resnet18", "projector_hidden": 32, "predictor_hidden": 32, "projector_out": 16},
        "train": {"batch_size": 4, "precision": "fp32", "num_threads": 1, "device": "cpu",
                  "out_dir": str(tmp_path / "run")}}))
    out = tmp_path / "tuned.yaml"
    t0 = time.monotonic()
    assert main(["--config", str(base), "--budget", "20", "--out", str(out), "--backends", "torch"], started=t0) == 0
    assert time.monotonic() - t0 < 20 + 5
    printed = capsys.readouterr().out
    assert "Winner:" in printed and "images/s" in printed and "What would move it further" in printed
    text = out.read_text()
    assert text.startswith("# byol tune:") and "loader" in text
    load_config(out)   # validates alone
    assert yaml.safe_load(text)["data"]["path"] == str(tmp_path / "images")   # the data it was measured on
    tuned = load_configs([str(base), str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    assert tuned.data.backend == record["winner"]["data.backend"] == "torch"
    assert tuned.data.num_workers == record["winner"]["data.num_workers"]
    assert tuned.data.path == str(tmp_path / "images") and tuned.train.batch_size == 4   # the base's keys stay
    assert any(t["kind"] == "e2e" and t["images_per_sec"] for t in record["trials"])
    assert all(t["kind"] != "loader" or t.get("error") or t["peak_mem_mb"] for t in record["trials"])
