"""`byol tune`: the fastest loader settings for this machine, on the data and model of a config, as an override YAML.

    byol tune --config configs/demo_cpu.yaml [--budget 120] [--out tuned.yaml] [--backends dali,torch]
    byol train --config configs/demo_cpu.yaml --config tuned.yaml

It measures the loader alone and the training step it feeds over a small search (`benchmarks.tune_search`) that
stops within `--budget` seconds of wall-clock time, with a progress bar; then writes the winner as an override YAML
whose comments hold the table of everything tried (images/s, the share of the step spent waiting for data, peak
memory: the process's peak RSS on the CPU, the CUDA allocator's peak on a GPU), the trials in full in a `.json`
beside it, and says, in `byol profile`'s words, what limits the run after tuning and what would move it further.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import reduce
from pathlib import Path
from typing import Optional, Sequence

import yaml

from byolfast.benchmarks import common
from byolfast.benchmarks.tune_search import Tuner, data_backends, get, knobs, label
from byolfast.pipeline.registry import formats
from byolfast.pipeline.storage import write_bytes_atomic


# --- the command ---------------------------------------------------------------------------------------------------
def table(trials: Sequence[dict], preset: dict, winner: dict) -> list[str]:
    """Everything tried: loader = the loader alone, train = training steps fed by it."""
    lines = [f"{'kind':<6} {'images/s':>9} {'data wait':>9} {'peak MB':>8} {'s':>5}  settings"]
    for r in trials:
        ips, wait = r["images_per_sec"], r["data_wait_share"]
        note = "; ".join(n for n in ("preset" if r["settings"] == preset else "",
                                     "winner" if r["settings"] == winner else "", r.get("note", ""),
                                     r.get("error", "")[:90]) if n)
        lines.append(f"{'train' if r['kind'] == 'e2e' else 'loader':<6} {f'{ips:.1f}' if ips else '-':>9} "
                     f"{f'{100 * wait:.0f}%' if wait is not None else '-':>9} {r['peak_mem_mb'] or '-':>8} "
                     f"{r['seconds']:>5.1f}  {r['label']}" + (f"  ({note})" if note else ""))
    return lines


def verdict(tuner: Tuner, preset: dict, winner: dict, backends: Sequence[str], total_mb: float) -> list[str]:
    """What limits the run after tuning and what would move it further, in `byol profile`'s words."""
    e2e = tuner.ok("e2e")
    rec = next((r for r in e2e if r["settings"] == winner), None) or next((r for r in e2e if r["settings"] == preset),
                                                                        None)
    if rec is None:
        return ["No training step could be measured within the budget: raise --budget for a verdict."]
    report = rec["report"]
    lines = [("After tuning: " if rec["settings"] == winner else "Training steps were measured with the config's "
              "loader settings only: ") + report["summary"]]
    if total_mb and rec["peak_mem_mb"] and rec["peak_mem_mb"] >= 0.85 * total_mb:
        lines.append(f"Memory: the step peaks at {rec['peak_mem_mb']:.0f} of {total_mb:.0f} MB: lower "
                     "train.batch_size or the loader's read-ahead before anything else.")
    tips = list(report["advice"])
    backend = winner["data.backend"]
    if report["bound"] == "input-bound":
        first = knobs(backend, tuner.device_type, tuner.cores)
        if first and winner.get(first[0].key, 0) >= tuner.cores:
            tips.append(f"more cores: the {backend} loader already runs {first[0].key}={winner[first[0].key]} on "
                        f"{tuner.cores} cores")
        unconverted = [f for f in formats() if f not in backends]   # formats this data is not in yet
        if unconverted:
            tips.append(f"another backend: `byol convert` the images (at a max side near the view size) to try the "
                        f"formats of {' and '.join(unconverted)}")
    return lines + ["What would move it further:"] + [f"  {i}. {tip}" for i, tip in enumerate(tips, 1)]


def nested(settings: dict) -> dict:
    out: dict = {}
    for key, value in settings.items():
        *parents, name = key.split(".")
        reduce(lambda d, k: d.setdefault(k, {}), parents, out)[name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="byol tune", description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", help="a YAML preset; several: later files override earlier ones")
    p.add_argument("--budget", type=float, default=120.0, help="wall-clock seconds for the whole search")
    p.add_argument("--out", default="tuned.yaml", help="the override YAML (the trials also go to a .json beside it)")
    p.add_argument("--backends", default="", help="comma-separated backends to consider (default: all that can "
                                                  "read data.path; the config's own is always measured)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def process_start() -> float:
    """`time.monotonic()` when this process started, so that the budget counts the command's start-up (Python, torch);
    now when that is unknown (not Linux) or over a minute ago (called from a longer-lived program)."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            age = float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        age = 0.0
    return time.monotonic() - (age if 0.0 < age < 60.0 else 0.0)


def main(argv: Optional[Sequence[str]] = None, started: Optional[float] = None) -> int:
    """Entry point of `byol tune`; returns the exit status. The budget counts from `started` (`time.monotonic()`;
    default: when the process started)."""
    start = process_start() if started is None else started
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from byolfast.benchmarks import environment
    from byolfast.benchmarks.tune_measure import RealMeasure
    from byolfast.pipeline.contract import DataError
    from byolfast.train.cli import load_configs
    from byolfast.train.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    cfg = load_configs(args.config, args.overrides)
    if args.budget < 5:
        raise ConfigError(f"--budget must be at least 5 seconds, got {args.budget:g}")
    measure = RealMeasure(cfg)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    backends = data_backends(cfg.data.path, cfg.data.backend)
    if args.backends:
        asked = [b.strip() for b in args.backends.split(",") if b.strip()]
        from byolfast.pipeline.registry import BACKENDS
        unknown = sorted(set(asked) - set(BACKENDS))
        if unknown:
            raise ConfigError(f"--backends takes {', '.join(BACKENDS)} (unknown: {', '.join(unknown)})")
        backends = [b for b in backends if b == cfg.data.backend or b in asked]
    preset = {"data.backend": cfg.data.backend,
              **{k.key: get(cfg, k.key) for k in knobs(cfg.data.backend, measure.device.type, cores)}}
    bar = tqdm(total=round(args.budget), desc="byol tune", file=sys.stderr,
               bar_format="{desc} |{bar}| {n:.0f}/{total} s")

    def progress(rec: dict) -> None:
        best = max(tuner.ok("loader"), key=lambda r: r["images_per_sec"], default=None)
        bar.n = min(round(time.monotonic() - start), bar.total)
        bar.set_description_str(f"byol tune: {len(tuner.trials)} tried" + (
            f", fastest loader {best['images_per_sec']:.0f} img/s ({best['label'][:70]})" if best else ""))

    with logging_redirect_tqdm(), bar:
        tuner = Tuner(measure, args.budget, cores, measure.device.type, start=start, on_trial=progress)
        winner = tuner.run(preset, cfg, backends)
    if not tuner.ok("loader") and not tuner.ok("e2e"):
        first = next((r["error"] for r in tuner.trials if r.get("error")), "no trial fitted the budget")
        raise DataError(f"no setting could be measured within {args.budget:g} s ({first})")
    device_name = environment.device_name(measure.device)
    seconds = time.monotonic() - start
    rates = {kind: (tuner.rate(kind, preset), tuner.rate(kind, winner)) for kind in ("loader", "e2e")}
    said = [f"{what} {new:.1f} images/s (the config's: {old:.1f})" for what, (old, new) in
            (("loader alone", rates["loader"]), ("training", rates["e2e"])) if old and new]
    config = " ".join(f"--config {c}" for c in args.config or [])
    lines = [f"byol tune: {len(tuner.trials)} trials in {seconds:.0f} s (budget {args.budget:g} s) on {device_name}, "
             f"{cores} cores, {measure.device}; backends for this data: {', '.join(backends)}", "",
             *table(tuner.trials, preset, winner), "",
             f"Winner: {label(winner)}" + (" (the config's own settings)" if winner == preset else ""),
             *([f"  {', '.join(said)}"] if said else []),
             *verdict(tuner, preset, winner, backends, common.total_memory_mb(measure.device)), "",
             f"Apply: byol train {config} --config {args.out}"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {**winner, "data.path": cfg.data.path}   # and the data they were measured on (read by all of them)
    write_bytes_atomic(out, ("\n".join(f"# {line}".rstrip() for line in lines) + "\n"   # all or nothing
                             + yaml.safe_dump(nested(settings), sort_keys=False)).encode())
    sibling = common.write_json(out.with_suffix(".json"), {
        "config": args.config, "overrides": args.overrides, "budget_s": args.budget, "seconds": seconds,
        "cores": cores, "backends": backends, "preset": preset, "winner": winner, "verdict": lines,
        "env": environment.env_info(measure.device), "trials": tuner.trials})
    print("\n".join(lines) + f"\nWrote {out} and {sibling}")
    return 0


if __name__ == "__main__":   # `python -m byolfast.benchmarks.tune ...`, with the command's logging and error handling
    from byolfast.train.cli import main as cli_main
    sys.exit(cli_main(["tune", "--", *sys.argv[1:]]))
