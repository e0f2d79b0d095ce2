"""Atomic, verifiable checkpoints: written by rank 0 to a temporary name, fsynced, renamed; the last K kept.

A checkpoint is one file `ckpt-<step>.pt` plus `ckpt-<step>.pt.sha256`. Loading checks the digest (when present) and
loads with `weights_only=True`; `--resume auto` walks from the newest to older ones and uses the first that loads.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch

from byolfast.pipeline.storage import sha256_file, write_bytes_atomic

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")

# Keys that only steer the run, not what is learned: they may change freely between a checkpoint and its resume.
RUN_CONTROL_KEYS = (
    "train.max_steps", "train.resume", "train.allow_changed", "train.out_dir", "train.log_every", "train.ckpt_every",
    "train.keep_last", "train.device", "train.compile", "train.num_threads", "train.preempt_signals",
    "train.on_nonfinite", "train.max_skipped_steps", "data.path", "data.num_workers", "data.dali", "data.ffcv",
    "data.max_bad_fraction", "eval", "dist",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message says which file and what to do."""


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:08d}.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def save_checkpoint(state: dict, run_dir: str | Path, step: int, keep_last: int = 3) -> Path:
    """Write `state` atomically as checkpoint `step`, then delete all but the newest `keep_last` up to `step`.

    Checkpoints of later steps are never deleted here (see `set_aside_later`). The order on disk keeps every crash
    point loadable: the file and its digest are fsynced under temporary names, a stale digest of the same step is
    removed, the file is renamed into place, then the digest.

    Raises:
        CheckpointError: the disk is full or not writable; the previous checkpoints are left untouched.
    """
    run_dir = Path(run_dir)
    final = checkpoint_path(run_dir, step)
    sidecar = final.with_name(final.name + ".sha256")
    tmp = final.with_name(final.name + ".tmp")
    sidecar_tmp = tmp.with_name(final.name + ".sha256.tmp")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        with open(sidecar_tmp, "w") as f:
            f.write(sha256_file(tmp) + "\n")
            f.flush()
            os.fsync(f.fileno())
        sidecar.unlink(missing_ok=True)   # overwriting this step: never pair the new file with the old digest
        os.replace(tmp, final)
        os.replace(sidecar_tmp, sidecar)
        _fsync_dir(run_dir)
    except OSError as err:
        for p in (tmp, sidecar_tmp):
            p.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {final}: {err.strerror or err}. The previous checkpoints "
                              f"are intact; free space or fix permissions on {run_dir}, then resume.") from None
    earlier = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) <= step]
    for old in earlier[:-keep_last]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return final


def checkpoint_step(path: Path) -> int:
    m = _NAME.match(path.name)
    if m is None:
        raise ValueError(f"{path} is not named like a checkpoint (ckpt-<8 digits>.pt)")
    return int(m.group(1))


def set_aside_later(run_dir: str | Path, step: int) -> list[Path]:
    """Rename the checkpoints of steps after `step` to `<name>.superseded` (with their digests): a run resumed from
    an earlier step abandons them, and `--resume auto` must not come back to them. Nothing is deleted."""
    moved = []
    for p in list_checkpoints(run_dir):
        if checkpoint_step(p) > step:
            for f in (p, p.with_name(p.name + ".sha256")):
                if f.exists():
                    os.replace(f, f.with_name(f.name + ".superseded"))
            moved.append(p)
    if moved:
        log.warning("resumed at step %d: set aside the later checkpoint(s) of the abandoned run as *.superseded: %s",
                    step, ", ".join(p.name for p in moved))
    _set_aside_later_metrics(Path(run_dir) / "metrics.jsonl", step)
    return moved


def _set_aside_later_metrics(path: Path, step: int) -> None:
    """Keep in `metrics.jsonl` the rows up to `step`; append the abandoned run's later rows (and any torn line) to
    `metrics.jsonl.superseded`, so that the resumed run's rows do not repeat steps."""
    if not path.is_file():
        return
    keep, later = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            row_step = None
        (keep if isinstance(row_step, int) and row_step <= step else later).append(line + "\n")
    if not later:
        return
    with open(path.with_name(path.name + ".superseded"), "a", encoding="utf-8") as f:
        f.writelines(later)
    write_bytes_atomic(path, "".join(keep).encode("utf-8"))
    log.warning("resumed at step %d: %d later row(s) of metrics.jsonl moved to %s.superseded", step, len(later),
                path.name)


def set_aside_previous_run(run_dir: str | Path) -> Path | None:
    """Move an earlier run's checkpoints, metrics and TensorBoard log out of the way of a fresh run in the same
    folder, into `<run_dir>/previous-<n>/`; returns that folder (None when there was nothing to move)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    names = [p for p in run_dir.iterdir() if p.name.startswith("ckpt-") or p.name in ("metrics.jsonl", "tb")]
    if not any(_NAME.match(p.name) or p.name == "metrics.jsonl" for p in names):
        return None
    n = 1
    while (run_dir / f"previous-{n}").exists():
        n += 1
    dest = run_dir / f"previous-{n}"
    dest.mkdir()
    for p in names:
        os.replace(p, dest / p.name)
    log.warning("%s held an earlier run (a fresh run was asked for, train.resume is empty): moved its checkpoints and "
                "metrics to %s", run_dir, dest)
    return dest


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in the run folder, oldest first (temporary files are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if _NAME.match(p.name))


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load and verify one checkpoint (digest, then `weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        expected = sidecar.read_text().strip()
        if sha256_file(path) != expected:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt (sha256 does not match {sidecar.name})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError, zipfile errors for bad files
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{str(path)!r} is not a byolfast training checkpoint (no 'model'/'step')")
    return state


def latest_valid_checkpoint(run_dir: str | Path, map_location: Any = "cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; a corrupt or partial newer one is skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
    return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict, allowed: Iterable[str] = ()) -> list[str]:
    """Keys whose values differ between a checkpoint's config and the current one, minus run-control and
    explicitly allowed keys (a key also matches every key below it: `data.augment` covers `data.augment.view1.*`)."""
    skip = tuple(RUN_CONTROL_KEYS) + tuple(allowed)
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == s or key.startswith(s + ".") for s in skip):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: checkpoint {a.get(key)!r} -> now {b.get(key)!r}")
    return diffs


def find_resume_point(where: str, run_dir: Path) -> tuple[Path, dict] | None:
    """`where` (`auto`: the newest valid checkpoint in `run_dir`, None when there is none) as (path, state)."""
    if where == "auto":
        return latest_valid_checkpoint(run_dir)
    return Path(where), load_checkpoint(where)


def check_resumable(state: dict, path: Path, config: dict, allowed: Iterable[str], steps_per_epoch: int) -> None:
    """Refuse a checkpoint trained with another config, or on data with another number of steps per epoch (the LR
    and tau schedules and the position in the epoch would jump), unless `train.allow_changed` names the change."""
    allowed = list(allowed)
    diffs = config_differences(state.get("config", {}), config, allowed)
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was trained with a different config:\n  " + "\n  ".join(diffs) +
            "\nuse the checkpoint's values, or allow an intentional change with "
            "train.allow_changed=[key,...] (e.g. train.allow_changed=[train.base_lr])")
    saved_spe = state.get("steps_per_epoch")
    if saved_spe is not None and saved_spe != steps_per_epoch and "data.size" not in allowed:
        raise CheckpointError(
            f"checkpoint {path} was trained with {saved_spe} steps per epoch, this run has "
            f"{steps_per_epoch} (a different number of images in data.path, or another loader): "
            "the LR and tau schedules and the position in the epoch would jump. Resume on the same data, or "
            "accept the jump with train.allow_changed=[data.size]")


def load_model(model: torch.nn.Module, state: dict, path: Path) -> None:
    """The saved weights, or a one-line error when they do not fit this model."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:   # another architecture, or heads of an older layout
        first = str(err).strip().splitlines()
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({first[1].strip() if len(first) > 1 else first[0]}): "
            "resume it with the model settings it was trained with, or start a fresh run in another "
            "train.out_dir") from None


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict, path: Path, optimizer_name: str) -> None:
    """The saved momentum buffers; the hyper-parameters stay this run's (`train.allow_changed` may change them; the
    LR is set by the schedule every step). A checkpoint of another optimizer leaves fresh momentum, with a warning."""
    saved = state.get("config", {}).get("train", {}).get("optimizer", optimizer_name)
    if saved != optimizer_name:
        log.warning("%s was trained with train.optimizer=%s: the %s optimizer starts with fresh momentum",
                    path, saved, optimizer_name)
        return
    configured = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])   # it restores the saved hyper-parameters too: undo that
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
