"""`convert_report.json`: what `byol convert` did, and what it left out of each output.

The report lies in the conversion's `out` folder, beside each format's folder. Loaders of converted data read it back
through `storage.skipped_at_convert` (below the backends, which must not import the conversion), so a run says how
many images the conversion skipped and why.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from byolfast.pipeline.storage import REPORT

logger = logging.getLogger(__name__)



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
