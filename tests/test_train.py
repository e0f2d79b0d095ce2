"""The trainer end to end on the CPU: a short run, exact resume, preemption, bad checkpoints, NaN, export/eval."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from conftest import tiny_overrides
from byolfast.train.checkpoint import CheckpointError, list_checkpoints
from byolfast.train.cli import main as byol
from byolfast.train.config import load_config
from byolfast.train.loop import NonFiniteError, Trainer

REPO = Path(__file__).resolve().parent.parent


def _train(overrides) -> tuple[dict, Trainer]:
    trainer = Trainer(load_config(None, overrides))
    return trainer.run(), trainer


def _losses(trainer) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in trainer.state.history if "loss" in m}


def test_short_run_writes_everything(tmp_path):
    summary, trainer = _train(tiny_overrides(tmp_path / "run", steps=4) + ["train.ckpt_every=2"])
    run = tmp_path / "run"
    assert trainer.loader.stop_epoch == math.ceil(4 / trainer.schedule.steps_per_epoch)   # no epoch prepared beyond
    assert summary["steps"] == 4 and math.isfinite(summary["final_loss"]) and summary["collapse_std"] > 0
    assert (run / "config.yaml").is_file() and json.loads((run / "run_info.json").read_text())["git"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    assert list(run.glob("tb/events.out.tfevents.*"))
    # the target moved toward the online network but is not equal to it
    online = dict(trainer.model.online.named_parameters())
    diffs = [(online[k] - v).abs().max().item() for k, v in trainer.model.target.named_parameters()]
    assert max(diffs) > 0


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, digits16):
    data = str(digits16 / "train")
    full, ref = _train(tiny_overrides(tmp_path / "a", data, "torch", steps=6))
    _train(tiny_overrides(tmp_path / "b", data, "torch", steps=3))
    resumed, res = _train(tiny_overrides(tmp_path / "b", data, "torch", steps=6) + ["train.resume=auto"])
    a, b = _losses(ref), _losses(res)
    assert set(b) == set(range(1, 7))
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]   # exact, not approximate
    for (k, v), w in zip(ref.model.state_dict().items(), res.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_truncated_newest_checkpoint_falls_back(tmp_path, caplog):
    run = tmp_path / "run"
    _train(tiny_overrides(run, steps=4) + ["train.ckpt_every=2"])
    newest = list_checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    _, trainer = _train(tiny_overrides(run, steps=5) + ["train.resume=auto"])
    assert "falling back" in caplog.text and "corrupt" in caplog.text
    steps = [m["step"] for m in trainer.state.history if "loss" in m]
    assert steps[-3:] == [3, 4, 5]    # resumed from step 2
    # the corrupt file is set aside, not retried by the next `auto`
    assert (run / "ckpt-00000004.pt.superseded").is_file()
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000002.pt", "ckpt-00000005.pt"]


def test_checkpoints_of_another_run_are_never_deleted(tmp_path):
    """keep_last counts the checkpoints up to the step being saved: a fresh run in a used folder moves the earlier
    run aside (it used to delete its own new checkpoints, which sorted below the old ones), and resuming from an
    earlier step sets the abandoned later checkpoints aside."""
    run = tmp_path / "run"
    _train(tiny_overrides(run, steps=4) + ["train.ckpt_every=2", "train.keep_last=1"])
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000004.pt"]
    _train(tiny_overrides(run, steps=3) + ["train.ckpt_every=1", "train.keep_last=2"])
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    assert [p.name for p in list_checkpoints(run / "previous-1")] == ["ckpt-00000004.pt"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3      # this run's steps only
    assert len((run / "previous-1" / "metrics.jsonl").read_text().splitlines()) == 4

    _train(tiny_overrides(run, steps=3) + [f"train.resume={run / 'ckpt-00000002.pt'}", "train.keep_last=2"])
    assert (run / "ckpt-00000003.pt").is_file()       # rewritten by the resumed run
    _train(tiny_overrides(run, steps=4) + ["train.resume=auto", "train.keep_last=5"])
    _, trainer = _train(tiny_overrides(run, steps=2) + ["train.resume=" + str(run / "ckpt-00000002.pt")])
    assert sorted(p.name for p in run.glob("*.superseded")) == [
        "ckpt-00000003.pt.sha256.superseded", "ckpt-00000003.pt.superseded",
        "ckpt-00000004.pt.sha256.superseded", "ckpt-00000004.pt.superseded", "metrics.jsonl.superseded"]
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000002.pt"]
    # the metrics of the abandoned steps are set aside too: no step is logged twice
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    later = [json.loads(line)["step"] for line in (run / "metrics.jsonl.superseded").read_text().splitlines()]
    assert later == [3, 3, 4]


def test_resume_takes_allowed_changes_of_the_optimizer_and_precision(tmp_path):
    # load_state_dict restores the saved hyper-parameters: an allowed change must win over them
    run = tmp_path / "run"
    _train(tiny_overrides(run, steps=2))
    changed = ["train.weight_decay=0.1", "train.momentum=0.5", "train.lars_eta=0.02"]
    _, trainer = _train(tiny_overrides(run, steps=3) + ["train.resume=auto", *changed,
                        "train.allow_changed=[train.weight_decay,train.momentum,train.lars_eta]"])
    groups = trainer.optimizer.param_groups
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]
    assert {g["momentum"] for g in groups} == {0.5} and {g["eta"] for g in groups} == {0.02}
    assert any(trainer.optimizer.state.values())   # the momentum buffers were loaded
    # another optimizer starts fresh; an fp32 checkpoint (empty scaler state) resumes as fp16
    summary, trainer = _train(tiny_overrides(run, steps=4) + [
        "train.resume=auto", "train.optimizer=sgd", "train.precision=fp16", *changed,
        "train.allow_changed=[train.weight_decay,train.momentum,train.lars_eta,train.optimizer,train.precision]"])
    assert summary["steps"] == 4 and trainer.scaler.is_enabled()


def test_a_failed_start_closes_the_loader(tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path / "run") + ["train.resume=" + str(tmp_path / "no.pt")]))
    closed = []
    trainer.loader.close = lambda: closed.append(True)
    with pytest.raises(CheckpointError):
        trainer.run()
    assert closed


def test_resume_refuses_a_changed_config(tmp_path):
    run = tmp_path / "run"
    _train(tiny_overrides(run, steps=2))
    with pytest.raises(CheckpointError, match=r"train.base_lr: checkpoint 0.5 -> now 0.1"):
        _train(tiny_overrides(run, steps=3) + ["train.resume=auto", "train.base_lr=0.1"])
    # another dataset size (data.path may change freely) moves every schedule: refused unless accepted
    sized = tmp_path / "sized"
    _train(tiny_overrides(sized, steps=2))
    with pytest.raises(CheckpointError, match="8 steps per epoch, this run has 4"):
        _train(tiny_overrides(sized, steps=3) + ["train.resume=auto", "data.synthetic_size=32",
                                                 "train.allow_changed=[data.synthetic_size]"])
    summary, _ = _train(tiny_overrides(sized, steps=3) + ["train.resume=auto", "data.synthetic_size=32",
                                                          "train.allow_changed=[data.synthetic_size,data.size]"])
    assert summary["steps"] == 3
    summary, _ = _train(tiny_overrides(run, steps=3) + ["train.resume=auto", "train.base_lr=0.1",
                                                        "train.allow_changed=[train.base_lr]"])
    assert summary["steps"] == 3


def _poison_loss(monkeypatch, is_bad) -> None:
    """Make the loss NaN on the calls `is_bad(n)` selects (two calls per step: one per direction)."""
    import byolfast.model.byol as byol_module
    real = byol_module.regression_loss
    calls = {"n": 0}

    def poisoned(p, t):
        calls["n"] += 1
        out = real(p, t)
        return out * float("nan") if is_bad(calls["n"]) else out

    monkeypatch.setattr(byol_module, "regression_loss", poisoned)


def test_nan_loss_stops_cleanly_naming_the_step(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, lambda n: n > 4)    # step index 2 (the third step) is the first bad one
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="non-finite at step 2"):
        _train(tiny_overrides(run, steps=6) + ["train.ckpt_every=2", "train.log_every=3"])
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000002.pt"]   # the last good one is kept


def test_nan_loss_skip_mode_counts(tmp_path, monkeypatch):
    _poison_loss(monkeypatch, lambda n: n in (3, 4))
    summary, _ = _train(tiny_overrides(tmp_path / "run", steps=4) + ["train.on_nonfinite=skip"])
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4


def test_fp16_overflow_skips_the_step_and_the_ema():
    """fp16 (autocast + grad scaler, also on the CPU): a step whose scaled gradients overflow moves neither the online
    nor the target network, and lowers the scale; a step with a sane scale moves both. The step is built alone: a
    model, an optimizer, two schedules, no loader, run folder or trainer."""
    from byolfast.model import ModelConfig, build_byol
    from byolfast.pipeline import Batch
    from byolfast.train.optim import build_optimizer
    from byolfast.train.step import Stepper
    torch.manual_seed(0)
    model = build_byol(ModelConfig(arch="resnet18", small_stem=True, projector_hidden=64, predictor_hidden=64,
                                   projector_out=32, bn="local"), device_type="cpu")
    stepper = Stepper(model, build_optimizer(model, "lars", 0.9, 1e-6, 1e-3), lr_at=lambda k: 0.5,
                      tau_at=lambda k: 0.99, device=torch.device("cpu"), precision="fp16", max_skipped_steps=2,
                      scaler=torch.amp.GradScaler("cpu", init_scale=1.0))
    views = [torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    batch = Batch(views[0], views[1], torch.zeros(8, dtype=torch.int64), torch.arange(8))
    model.train()

    def snapshot():
        return ([p.detach().clone() for p in model.online.parameters()],
                [p.detach().clone() for p in model.target.parameters()])

    def moved(before, after):
        return any(not torch.equal(a, b) for a, b in zip(before, after))

    online0, target0 = snapshot()
    stepper(batch, 3)          # a normal step (LR > 0): afterwards the target differs from the online one
    online1, target1 = snapshot()
    assert moved(online0, online1) and moved(target0, target1)

    stepper.scaler.update(new_scale=2.0 ** 120)       # fp16 gradients of a loss scaled this much are inf
    stepper(batch, 4)
    online2, target2 = snapshot()
    assert not moved(online1, online2) and not moved(target1, target2)
    assert stepper.scaler.get_scale() < 2.0 ** 120 and stepper.overflows_in_a_row == 1
    # a run whose fp16 gradients keep overflowing has diverged: after max_skipped_steps in a row it stops
    stepper(batch, 5)
    with pytest.raises(NonFiniteError, match="3 steps in a row"):
        stepper(batch, 6)


def _run_cli(args, env_extra=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "byolfast.train", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(tmp_path, digits16):
    # SIGTERM to the whole process group, as `timeout` and schedulers send it: the loader's worker processes get it
    # too and must leave the stopping to the trainer (torch's worker handler killed them, and the step with them).
    data = str(digits16 / "train")
    run = tmp_path / "run"
    proc = _run_cli(tiny_overrides(run, data, "torch", steps=200) + ["data.num_workers=2"], start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    stopped = int(list_checkpoints(run)[-1].name[5:13])
    assert 2 <= stopped < 200
    _, res = _train(tiny_overrides(run, data, "torch", steps=stopped + 2) + ["train.resume=auto"])
    _, ref = _train(tiny_overrides(tmp_path / "ref", data, "torch", steps=stopped + 2))
    a, b = _losses(ref), _losses(res)
    assert [a[s] for s in range(1, stopped + 3)] == [b[s] for s in range(1, stopped + 3)]


def test_a_rank_standing_preempted_ignores_the_launchers_sigterm_and_exits_75_on_a_second():
    # torchrun sends SIGTERM to the ranks still running once one has exited 75; a rank still closing its loader then
    # died with -15. After hold() the next signal is ignored; another one ends the process with 75 at once (a hung
    # teardown can still be stopped).
    script = (
        "import os, signal, sys, time\n"
        "from byolfast.train.preempt import PreemptFlag\n"
        "flag = PreemptFlag(['SIGUSR1'])\n"
        "flag.hold()\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(0.2)\n"
        "assert flag.signum is None and flag.held == 1\n"
        "print('alive after one', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(5)\n"
        "print('still alive', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75 and proc.stdout == "alive after one\n", (proc.stdout, proc.stderr)
    # The interpreter's shutdown puts the default handlers back before it frees the loader's and the process
    # group's objects (a SIGTERM then killed rank 0 with -15 in CI): a held process leaves at its first exit
    # handler, with status 75 and its output flushed, and the later handlers do not run.
    script = (
        "import atexit, sys\n"
        "from byolfast.train.preempt import PreemptFlag\n"
        "atexit.register(print, 'a later exit handler ran')\n"
        "PreemptFlag(['SIGUSR1']).hold()\n"
        "print('held', end='')\n"
        "sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75 and proc.stdout == "held", (proc.stdout, proc.stderr)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert byol(["train", "train.batch_sise=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key" in err and "Traceback" not in err
    assert byol(["train", *tiny_overrides(tmp_path / "r", str(tmp_path / "missing"), "torch")]) == 2
    assert f"data.path '{tmp_path / 'missing'}' does not exist" in capsys.readouterr().err
    assert byol(["eval", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    for device, says in (("gpu", "is not a device"), ("meta", "runs on cpu or cuda")):
        assert byol(["train", *tiny_overrides(tmp_path / "r", steps=1), f"train.device={device}"]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    assert byol(["train", *tiny_overrides(blocked / "run", steps=1)]) == 2   # out_dir below a file
    err = capsys.readouterr().err
    assert "cannot write or read" in err and "Traceback" not in err


def test_export_loads_into_torchvision_and_eval_reports_knn(tmp_path, digits16, capsys):
    run = tmp_path / "run"
    _train(tiny_overrides(run, str(digits16 / "train"), "torch", steps=2))
    ckpt = list_checkpoints(run)[-1]
    out = tmp_path / "encoder.pt"
    assert byol(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    tv = torchvision.models.resnet18()
    tv.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)   # the small stem, as the README explains
    tv.maxpool = torch.nn.Identity()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(sd, strict=True)
    state = torch.load(ckpt, weights_only=True)
    assert torch.equal(sd["conv1.weight"], state["model"]["online.encoder.conv1.weight"])
    capsys.readouterr()
    res_file = tmp_path / "eval.json"
    assert byol(["eval", "--checkpoint", str(ckpt), "--data", str(digits16), "--k", "5", "20", "--workers", "0",
                 "--linear", "--linear-epochs", "20", "--out", str(res_file)]) == 0
    res = json.loads(res_file.read_text())
    assert 0.0 <= res["knn_top1"] <= 1.0 and res["knn_top1"] > 0.2   # 10 classes: well above chance
    assert 0.0 <= res["linear_top1"] <= 1.0
    assert res["num_val"] == len(list((digits16 / "val").glob("*/*.jpg")))

    capsys.readouterr()
    assert byol(["eval", "--checkpoint", str(ckpt), "--data", str(digits16), "--batch-size", "0"]) == 2
    assert "--batch-size=0 is out of range" in capsys.readouterr().err

    # train/ and val/ with different classes: one line naming both counts, exit 2
    odd = tmp_path / "odd"
    shutil.copytree(digits16 / "train", odd / "train")
    shutil.copytree(digits16 / "val", odd / "val")
    shutil.rmtree(sorted((odd / "val").iterdir())[-1])
    capsys.readouterr()
    assert byol(["eval", "--checkpoint", str(ckpt), "--data", str(odd), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "different class folders (10 and 9)" in err and "Traceback" not in err

    # a file that is not an image, read in a worker process: one line naming it
    broken = tmp_path / "broken"
    shutil.copytree(digits16, broken)
    bad = sorted((broken / "val").glob("*/*.jpg"))[0]
    bad.write_text("not an image")
    assert byol(["eval", "--checkpoint", str(ckpt), "--data", str(broken), "--workers", "1", "--k", "5"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    # one image per class leaves no held-out image; negative workers
    single = tmp_path / "single"
    for d in sorted((digits16 / "train").iterdir())[:3]:
        (single / d.name).mkdir(parents=True)
        shutil.copy(sorted(d.iterdir())[0], single / d.name)
    assert byol(["eval", "--checkpoint", str(ckpt), "--data", str(single), "--workers", "0"]) == 2
    assert "held-out split is empty" in capsys.readouterr().err
    assert byol(["eval", "--checkpoint", str(ckpt), "--data", str(digits16), "--workers", "-1"]) == 2
    assert "--workers must be >= 0" in capsys.readouterr().err


def test_evaluation_normalises_as_the_training_did(tmp_path):
    from PIL import Image

    from byolfast.train.evaluate import extract_features
    (tmp_path / "a").mkdir()
    Image.new("RGB", (20, 20), (255, 255, 255)).save(tmp_path / "a" / "white.png")
    seen = []
    encoder = torch.nn.Module()
    encoder.forward = lambda x: (seen.append(x), x.flatten(1))[1]
    extract_features(encoder, [(str(tmp_path / "a" / "white.png"), 0)], 16, 1, torch.device("cpu"),
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert torch.allclose(seen[0], torch.ones_like(seen[0]))   # (1 - 0.5) / 0.5, not ImageNet's constants


def test_knn_and_linear_monitor_during_training(tmp_path, digits16):
    from byolfast.pipeline.contract import DataError
    from byolfast.train.config import ConfigError
    base = tiny_overrides(tmp_path / "run", str(digits16 / "train"), "torch", steps=2) + [
        "eval.every=2", "eval.image_size=16", "eval.batch_size=64", "eval.k=[5]"]
    summary, _ = _train(base + [f"eval.data={digits16}", "eval.linear_epochs=2"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scores = [r for r in rows if "knn_top1" in r]
    assert [r["step"] for r in scores] == [2] and 0 <= scores[0]["linear_top1"] <= 1
    assert 1.0 <= scores[0]["feature_rank"] <= 512                  # logged beside the kNN (ResNet-18: 512 dims)
    assert summary["images_per_sec"] > 0
    with pytest.raises(ConfigError, match="eval.data"):
        load_config(None, base)                                       # a monitor with nothing to evaluate on
    with pytest.raises(DataError, match="evaluation data"):
        _train(base + [f"eval.data={tmp_path / 'missing'}", f"train.out_dir={tmp_path / 'run2'}"])
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()         # refused before the first step
    # an evaluation image that breaks during the run costs that evaluation, not the training
    broken = tmp_path / "broken"
    shutil.copytree(digits16, broken)
    sorted((broken / "val").glob("*/*.jpg"))[0].write_text("not an image")
    summary, _ = _train(base + [f"eval.data={broken}", f"train.out_dir={tmp_path / 'run3'}"])
    assert summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run3" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "knn_top1" in r]


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from byolfast.train import checkpoint as ckpt_module
    run = tmp_path / "run"
    _train(tiny_overrides(run, steps=2) + ["train.ckpt_every=2"])
    before = list_checkpoints(run)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)          # part of the file reaches the disk, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoints are intact"):
        _train(tiny_overrides(run, steps=4) + ["train.resume=auto", "train.ckpt_every=2"])
    assert list_checkpoints(run) == before and not list(run.glob("*.tmp"))
    monkeypatch.setattr(ckpt_module.torch, "save", real_save)
    ckpt_module.load_checkpoint(before[-1])   # still valid
