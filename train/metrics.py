"""The run's metrics on disk: `metrics.jsonl` (one JSON object per logged step) and TensorBoard scalars."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


class MetricsWriter:
    """Appends each metrics dict to `<run_dir>/metrics.jsonl` and its numbers to TensorBoard (`<run_dir>/tb`).

    Args:
        run_dir: the run folder.
        purge_step: on resume, the first step this run logs: TensorBoard drops the events an abandoned run logged
            from there on (`set_aside_later` does the same for `metrics.jsonl`).
    """

    def __init__(self, run_dir: Path, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter   # imported when a run starts, not with the package
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tensorboard = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge_step)

    def write(self, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tensorboard.add_scalar(k, v, metrics["step"])

    def close(self) -> None:
        self.tensorboard.close()
