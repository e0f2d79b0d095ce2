"""`convert_report.json`: what `byol convert` did, and what it left out of each output, read back by the loaders.

The report lies in the conversion's `out` folder, beside `dali/` and `ffcv/`. Loaders of converted data find it
through `skipped_at_convert`, so a run says how many images the conversion skipped and why.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

logger = logging.getLogger(__name__)

REPORT = "convert_report.json"


@dataclass
class ConvertReport:
    """What a conversion did. `skipped` paths are relative to `src`; `outputs` is per format."""

    src: str
    out: str
    num_candidates: int
    num_samples: int
    classes: list[str]
    empty_classes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reencoded: dict[str, int] = field(default_factory=dict)
    passthrough: int = 0
    outputs: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_sec: float = 0.0

    def summary(self) -> str:
        """One paragraph for the log."""
        skip_reasons = Counter(r.split(":", 1)[0] for _, r in self.skipped)
        skips = ", ".join(f"{n} {r}" for r, n in skip_reasons.items()) or "-"
        reencoded = ", ".join(f"{n} {r}" for r, n in self.reencoded.items()) or "-"
        outs = "; ".join(f"{fmt} {o['status']} ({o['num_samples']} samples, {o['bytes'] / 1e6:.1f} MB, {o['path']})"
                         for fmt, o in self.outputs.items())
        return (f"Converted {self.num_samples} of {self.num_candidates} images in {len(self.classes)} classes from "
                f"{self.src}: {len(self.skipped)} skipped ({skips}), {sum(self.reencoded.values())} re-encoded "
                f"({reencoded}), {self.passthrough} kept byte for byte; empty classes: "
                f"{', '.join(self.empty_classes) or 'none'}. Outputs: {outs}. {self.seconds:.1f} s, "
                f"{self.images_per_sec:.0f} images/s.")


def skipped_at_convert(output: str | os.PathLike, num_samples: int | None = None) -> dict:
    """What `byol convert` left out of one of its outputs, from the `convert_report.json` above it.

    The report lies in the conversion's `out` folder, one level above `ffcv/train.beton` and `dali/`. It counts only
    when it lists `output` (at the same place relative to the report, so a moved `out` folder still matches) and,
    when `num_samples` is given, with that many samples; anything else is another conversion's report.

    Args:
        output: the beton file or the shard folder a loader reads.
        num_samples: the samples the loader found in `output`.

    Returns:
        {"convert_skipped": count, "convert_skip_reasons": {reason: count}, "convert_report": report path}, or {}
        when no report describes `output`.
    """
    output = Path(output).resolve()
    folder = output if output.is_dir() else output.parent
    for path in (folder / REPORT, folder.parent / REPORT):
        if not path.is_file():
            continue
        try:
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
            records = list(report["outputs"].values())
            skipped = [reason for _, reason in report["skipped"]]
            listed = [Path(r["path"]).resolve().relative_to(Path(report["out"]).resolve()) for r in records]
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            logger.warning("%s is unreadable (%s): cannot tell how many images `byol convert` skipped", path, e)
            return {}
        here = output.relative_to(path.parent)
        record = next((r for r, rel in zip(records, listed) if rel == here), None)
        if record is None:
            continue
        if num_samples is not None and record.get("num_samples") != num_samples:
            logger.warning("%s lists %s samples for %s, which holds %d: the report is from another conversion; "
                           "skipped images are not counted", path, record.get("num_samples"), output, num_samples)
            return {}
        reasons = Counter(r.split(":", 1)[0] for r in skipped)
        return {"convert_skipped": len(skipped), "convert_skip_reasons": dict(reasons), "convert_report": str(path)}
    return {}


def other_outputs(out: Path, report: ConvertReport, formats: Sequence[str]) -> dict:
    """The earlier report's outputs of formats this run did not touch (`--format dali` after `--format ffcv`), kept
    when that run read the same source and skipped the same files, so the report still describes them."""
    try:
        with open(out / REPORT, encoding="utf-8") as f:
            old = json.load(f)
        same = (old["src"] == report.src and old["num_candidates"] == report.num_candidates
                and sorted(map(tuple, old["skipped"])) == sorted(map(tuple, report.skipped)))
        earlier = dict(old["outputs"]) if same else {}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return {}
    return {f: o for f, o in earlier.items() if f not in formats and (out / f).exists()}


def previous_report(out: Path, src: Path, n: int, classes: list[str], empty: list[str]) -> ConvertReport:
    """The report of a run with nothing left to do: what the earlier run found (skips, re-encodings) carried over."""
    report = ConvertReport(src=str(src), out=str(out), num_candidates=n, num_samples=0, classes=classes,
                           empty_classes=empty)
    try:
        with open(out / REPORT, encoding="utf-8") as f:
            old = json.load(f)
        report.num_samples, report.passthrough = old["num_samples"], old["passthrough"]
        report.skipped = [tuple(s) for s in old["skipped"]]
        report.reencoded = old["reencoded"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        logger.info("%s: no readable earlier %s; skipped files are not listed", out, REPORT)
    return report
