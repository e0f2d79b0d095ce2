"""The search behind `byol tune` (`benchmarks.tune`): which settings to try, in what order, within a hard budget.

A small search, not a grid:
  1. the verdict: training steps of the config as given, fed by its own loader, timed per stage (`byol profile`'s
     stage timer and bottleneck report): input-bound or compute-bound;
  2. the loader alone (`byol bench`'s timing: the loader's read-ahead is drained before the clock starts), from the
     config's settings and from a start at the machine's core count for each backend that can read the data, then one
     setting at a time in the order they matter (parallelism first). Numbers are climbed from the start, first in the
     direction the verdict favours (more threads when input-bound; fewer when compute-bound on a CPU, where the
     loader shares the cores with the model), while they keep improving;
  3. training steps again, fed by the best loader settings.
A setting replaces the config's only when it is no slower on either measure (within `NOISE`) and faster on one of
them by more than `NOISE`, so a slow setting is never chosen. Each trial is capped (SIGALRM) so that the whole
search fits the budget; a trial that raises is recorded with its error and skipped. Pure logic over a `Measure`
function (`benchmarks.tune_measure.RealMeasure` times the real loaders and trainer), so it is tested without them.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import signal
import threading
import time
from functools import reduce
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from byolfast.benchmarks import common
from byolfast.pipeline.backends import Knob
from byolfast.pipeline.registry import BACKENDS

log = logging.getLogger(__name__)

NOISE = 0.05                # rates within 5 % are the same rate on a machine shared with other work
E2E_SHARE = 0.2             # the longest training trial, as a share of the budget
LOADER_SHARE = 0.06         # the longest loader trial (at least MIN_LOADER_S)
MIN_LOADER_S = 3.0
RESERVE_SHARE = 0.04        # kept for writing the results and closing the loaders (at least 1 s)
LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class TrialTimeout(Exception):
    """A trial ran past its cap."""


class _Deferral:
    """Whether the cap may interrupt now (`cap_deferred` blocks count up) and a cap that expired meanwhile."""

    depth = 0
    expired: Optional[str] = None


@contextlib.contextmanager
def hard_deadline(seconds: float) -> Iterator[None]:
    """Raise `TrialTimeout` in the block after `seconds` (SIGALRM; only in the main thread, elsewhere a no-op).
    Code inside C (a numba compile, a DALI build) is interrupted when it returns to Python; inside a `cap_deferred`
    block, when that block ends. An outer interval timer (pytest-timeout's, say) is re-armed with what it had left."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    message = f"stopped at its cap of {seconds:.1f} s"

    def expire(signum, frame):
        if _Deferral.depth:
            _Deferral.expired = message
            return
        raise TrialTimeout(message)

    previous = signal.signal(signal.SIGALRM, expire)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _Deferral.expired = None
        if outer > 0:   # the outer timer goes on; one that fell due meanwhile fires at once
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


@contextlib.contextmanager
def cap_deferred() -> Iterator[None]:
    """Hold a trial's cap back during set-up and clean-up that must not stop halfway (a loader built and not yet
    owned by anyone, a loader being closed); a cap that expired meanwhile raises when the block ends normally."""
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
    if not _Deferral.depth and _Deferral.expired:
        message, _Deferral.expired = _Deferral.expired, None
        raise TrialTimeout(message)


# --- what is searched ----------------------------------------------------------------------------------------------
def knobs(backend: str, device_type: str, cores: int) -> list[Knob]:
    """The settings that matter for `backend` (its record's `knobs`), parallelism first, on a ladder up to twice
    the cores."""
    ladder = tuple(sorted({v for v in LADDER if v <= 2 * cores} | {cores}))
    record = BACKENDS.get(backend)
    return record.knobs(device_type, ladder) if record is not None else []


def data_backends(path: str, backend: str) -> list[str]:
    """The backends that can read `path` (the config's backend first): a `.beton` (or a folder holding one) -> ffcv;
    `byol convert` shards -> dali; an ImageFolder tree -> torch and dali. Packages not installed are left out."""
    import importlib.util

    if backend in BACKENDS and BACKENDS[backend].bench_path is None:   # reads no images: nothing to compare
        return [backend]
    p = Path(path)
    found = []
    if p.suffix == ".beton" or any((p / rel).is_file() for rel in ("ffcv/train.beton", "train.beton")):
        found.append("ffcv")
    if any((p / rel).is_file() for rel in ("manifest.json", "dali/manifest.json")):
        found.append("dali")
    elif not found and p.is_dir():
        found += ["torch", "dali"]
    found = [b for b in found if all(importlib.util.find_spec(m) is not None for m in BACKENDS[b].requires)]
    return [backend] + [b for b in found if b != backend]


def get(cfg, key: str) -> Any:
    return reduce(getattr, key.split("."), cfg)


def with_settings(cfg, settings: dict):
    """A validated copy of `cfg` with the dotted `settings` applied."""
    from byolfast.train.config import validate

    new = copy.deepcopy(cfg)
    for key, value in settings.items():
        *parents, name = key.split(".")
        setattr(reduce(getattr, parents, new), name, value)
    validate(new)
    return new


def label(settings: dict) -> str:
    """`dali: num_threads=2 decoder=cpu` (the last part of each key names it: no two knobs share one)."""
    rest = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in settings.items() if k != "data.backend")
    return f"{settings.get('data.backend')}" + (f": {rest}" if rest else "")


# --- the search ----------------------------------------------------------------------------------------------------
Measure = Callable[[str, dict, float], dict]   # (kind "loader" | "e2e", settings, cap in s) -> measured fields


class Tuner:
    """The search over a `measure` function, within `budget_s` seconds counted from `start` on `clock`.

    Args:
        measure: times one setting; returns `images_per_sec` (and for `e2e` `data_wait_share`, `peak_mem_mb`,
            `report`); raises when the setting fails. It is called under a hard deadline of its cap.
        cores: CPU cores available to the loader; device_type: `cpu` or `cuda`.
        on_trial: called with each record (the progress bar).
    """

    def __init__(self, measure: Measure, budget_s: float, cores: int, device_type: str = "cpu",
                 start: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                 on_trial: Callable[[dict], None] = lambda rec: None):
        self.measure, self.budget, self.cores, self.device_type = measure, budget_s, cores, device_type
        self.clock, self.on_trial = clock, on_trial
        self.start = clock() if start is None else start
        self.reserve = max(1.0, RESERVE_SHARE * budget_s)
        self.loader_cap = max(MIN_LOADER_S, LOADER_SHARE * budget_s)
        self.e2e_cap = E2E_SHARE * budget_s
        self.loader_end = budget_s
        self.e2e_cost = 0.0         # seconds the config's own training trial took
        self.trials: list[dict] = []

    def left(self) -> float:
        return self.budget - self.reserve - (self.clock() - self.start)

    def trial(self, kind: str, settings: dict, cap: float, again: bool = False) -> Optional[dict]:
        """The record of `settings` (measured once per kind unless `again`), or None when the budget leaves no time
        for it."""
        for rec in self.trials:
            if rec["kind"] == kind and rec["settings"] == settings and not again:
                return rec
        backend = settings.get("data.backend")
        if not any(r["settings"].get("data.backend") == backend for r in self.trials):
            cap += BACKENDS[backend].first_start_s if backend in BACKENDS else 0.0
        need = min(1.0, self.budget / 60) if kind == "loader" else self.e2e_needs()
        cap = min(max(cap, need), self.left())
        if cap < need:
            return None   # too short to measure anything
        rec = {"kind": kind, "settings": dict(settings), "label": label(settings), "images_per_sec": None,
               "data_wait_share": None, "peak_mem_mb": None, "cap_s": round(cap, 1)}
        t0 = self.clock()
        try:
            with hard_deadline(cap):
                rec.update(self.measure(kind, dict(settings), cap))
        except Exception as err:  # a failing setting is recorded and skipped, never fatal
            log.info("%s %s: %s: %s", kind, rec["label"], type(err).__name__, err)
            rec.update(common.error_fields(err))
        rec["seconds"] = round(self.clock() - t0, 2)
        self.trials.append(rec)
        self.on_trial(rec)
        return rec

    def e2e_needs(self) -> float:
        """Seconds a training trial needs at least: start-up and first step, then three steps, as measured so far
        (a step in C++ cannot be interrupted, so a shorter cap would overrun)."""
        known = sorted(r["first_step_s"] + 3 * r["step_s"] + 1.0 for r in self.ok("e2e") if "step_s" in r)
        return known[len(known) // 2] if known else max(2.0, 0.5 * self.e2e_cost) * min(1.0, self.budget / 60)

    def rate(self, kind: str, settings: dict) -> Optional[float]:
        """The median images/s of the trials of `settings` that succeeded (None: none did)."""
        rates = sorted(r["images_per_sec"] for r in self.ok(kind) if r["settings"] == settings)
        return (rates[(len(rates) - 1) // 2] + rates[len(rates) // 2]) / 2 if rates else None

    def loader(self, settings: dict) -> Optional[float]:
        """Loader-only images/s of `settings` (None: failed, or no time left in the loader phase)."""
        if self.clock() - self.start >= self.loader_end:
            return None
        rec = self.trial("loader", settings, self.loader_cap)
        return self.rate("loader", settings) if rec else None

    def start_point(self, backend: str, preset: dict, cfg) -> dict:
        """The config's values of the backend's knobs, parallelism at the core count, DALI decoding on the CPU
        where there is no GPU."""
        point = {"data.backend": backend}
        for knob in knobs(backend, self.device_type, self.cores):
            point[knob.key] = preset.get(knob.key, get(cfg, knob.key))
        if backend == "dali" and self.device_type != "cuda":
            point["data.dali.decoder"] = "cpu"
        if len(point) > 1:
            point[knobs(backend, self.device_type, self.cores)[0].key] = self.cores
        return point

    def climb(self, point: dict, knob: Knob, up_first: bool) -> dict:
        """Move `knob` one rung at a time from `point`'s value while the loader gets faster by more than NOISE."""
        values = sorted(set(knob.values) | {point[knob.key]})
        best = self.loader(point)
        for step in ((1, -1) if up_first else (-1, 1)):
            i, moved = values.index(point[knob.key]) + step, False
            while 0 <= i < len(values):
                trial = {**point, knob.key: values[i]}
                rate = self.loader(trial)
                if rate is None or (best is not None and rate <= best * (1 + NOISE)):
                    break
                point, best, moved, i = trial, rate, True, i + step
            if moved:
                break
        return point

    def descend(self, point: dict, input_bound: bool) -> dict:
        """One setting at a time from `point`, keeping each change that makes the loader faster."""
        for i, knob in enumerate(knobs(point["data.backend"], self.device_type, self.cores)):
            if knob.when and point.get(knob.when[0]) != knob.when[1]:
                continue
            if knob.numeric:   # the first knob is the parallelism
                point = self.climb(point, knob, up_first=input_bound or self.device_type == "cuda" or i > 0)
                continue
            for value in knob.values:
                best, rate = self.loader(point), self.loader({**point, knob.key: value})
                if rate is not None and (best is None or rate > best * (1 + NOISE)):
                    point = {**point, knob.key: value}
        return point

    def run(self, preset: dict, cfg, backends: Sequence[str]) -> dict:
        """Search from the `preset` settings of `cfg` over `backends`; returns the winner's settings."""
        base = self.trial("e2e", preset, self.e2e_cap)
        bound = ((base or {}).get("report") or {}).get("bound", "input-bound")   # unknown: the loader may matter
        self.e2e_cost = min(base["seconds"] if base and not base.get("error") else self.e2e_cap, self.e2e_cap)
        self.loader_end = self.budget - self.reserve - 2 * max(self.e2e_cost, self.e2e_needs())   # two finalists
        self.loader(preset)
        for b in backends:
            start = self.start_point(b, preset, cfg)
            if self.loader(start) is None and self.clock() - self.start < self.loader_end:
                cut = next((r for r in self.trials if r["settings"] == start and r["kind"] == "loader"), {})
                if cut.get("error", "").startswith("TrialTimeout"):   # a first start on a busy machine is slow
                    self.trial("loader", start, 2 * cut["cap_s"], again=True)
        best_of = {b: max((r["images_per_sec"] for r in self.ok("loader") if r["settings"]["data.backend"] == b),
                          default=0.0) for b in backends}
        ranked = sorted(backends, key=lambda b: -best_of[b])
        for i, b in enumerate(ranked):
            if i and best_of[b] < 0.7 * best_of[ranked[0]] or not best_of[b]:
                continue
            top = max((r for r in self.ok("loader") if r["settings"]["data.backend"] == b),
                      key=lambda r: r["images_per_sec"])
            self.descend(dict(top["settings"]), bound == "input-bound")
        for settings in self.finalists(preset, bound, base):
            self.trial("e2e", settings, self.e2e_cap)
        winner = self.choose(preset)
        while winner != preset:   # training speed varies on a shared machine: measure both again, in turn
            runs = {label(s): sum(r["settings"] == s for r in self.ok("e2e")) for s in (preset, winner)}
            again = self.trial("e2e", min((preset, winner), key=lambda s: runs[label(s)]), self.e2e_cap, again=True)
            if again is None or again.get("error"):
                break
            winner = self.choose(preset)
        return winner

    def ok(self, kind: str) -> list[dict]:
        return [r for r in self.trials if r["kind"] == kind and not r.get("error") and r["images_per_sec"]]

    def finalists(self, preset: dict, bound: str, base: Optional[dict]) -> list[dict]:
        """Loader settings worth training steps: the fastest, and on a compute-bound CPU run the lightest one that
        is no slower than the preset's (it leaves the model the most cores), then the second fastest."""
        floor = (self.rate("loader", preset) or 0.0) * (1 - NOISE)
        pool = sorted((r for r in self.ok("loader") if r["settings"] != preset and r["images_per_sec"] >= floor),
                      key=lambda r: -r["images_per_sec"])
        out = pool[:1]
        if bound == "compute-bound" and self.device_type == "cpu" and pool:
            def parallelism(r: dict) -> int:
                first = knobs(r["settings"]["data.backend"], self.device_type, self.cores)
                return r["settings"].get(first[0].key, 0) if first else 0
            out.append(min(pool, key=lambda r: (parallelism(r), -r["images_per_sec"])))
        out += pool[1:2]
        seen: list[dict] = []
        return [s for s in (r["settings"] for r in out) if not (s in seen or seen.append(s))]

    def choose(self, preset: dict) -> dict:
        """The winner: the preset unless a setting is no slower on either measure and faster on one."""
        def same(s: dict) -> tuple:   # one key per setting, whatever the order of its keys
            return tuple(sorted(s.items(), key=lambda kv: kv[0]))

        loader_rate = {same(r["settings"]): self.rate("loader", r["settings"]) for r in self.ok("loader")}
        e2e_rate = {same(r["settings"]): self.rate("e2e", r["settings"]) for r in self.ok("e2e")}
        settings = {same(preset): preset, **{same(r["settings"]): r["settings"] for r in self.trials}}
        p = same(preset)
        l0, e0 = loader_rate.get(p), e2e_rate.get(p)

        def eligible(k: tuple) -> bool:
            if k == p:
                return True
            lr, er = loader_rate.get(k), e2e_rate.get(k)
            if lr is None or (l0 is not None and lr < l0 * (1 - NOISE)):
                return False
            if er is not None and e0 is not None and er < e0 * (1 - NOISE):
                return False
            return l0 is None or lr > l0 * (1 + NOISE) or (er is not None and e0 is not None and er > e0 * (1 + NOISE))

        pool = [k for k in settings if eligible(k)]
        if any(k != p for k in e2e_rate):   # other settings were trained with: only those may replace the config's,
            pool = [k for k in pool if k in e2e_rate] or [p]   # ranked by training speed, ties by the loader's
            top = max(e2e_rate.get(k, 0.0) for k in pool)
            pool = [k for k in pool if e2e_rate.get(k, 0.0) >= top * (1 - NOISE)]
        return settings[max(pool, key=lambda k: (loader_rate.get(k) or 0.0, k == p))]


