"""The run's metrics: the window between two log lines (`Window`) and their record on disk (`MetricsWriter`:
`metrics.jsonl`, one JSON object per logged step, and TensorBoard scalars)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator, Optional

import torch


class Window:
    """What happened since the last log line: the steps, their summed loss (kept on the device, so no step waits for
    the host), the seconds spent waiting for the loader, and the seconds paused (the kNN monitor, left out of the
    images/s). `totals` accumulates every closed window for the run's summary."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.images, self.seconds = 0, 0.0
        self.restart()

    def restart(self) -> None:
        """A new window from now: the caller restarts it after its logging, which the next window must not count."""
        self.loss_sum.zero_()
        self.steps, self.data_wait, self.paused, self.start = 0, 0.0, 0.0, time.perf_counter()

    def next_batch(self, it: Iterator):
        """The loader's next batch (None at the end of the epoch), its wait counted."""
        t0 = time.perf_counter()
        batch = next(it, None)
        self.data_wait += time.perf_counter() - t0
        return batch

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.float()
        self.steps += 1

    def pause(self, seconds: float) -> None:
        self.paused += seconds

    def close(self, global_batch: int, distributed: bool, world_size: int) -> dict:
        """The window's loss (of the global batch), images/s and data-wait share, added to the run's totals. The
        caller has synchronised the device, so the elapsed time covers the window's work; it calls `restart` once
        it has logged them."""
        elapsed = time.perf_counter() - self.start - self.paused
        if distributed:   # the loss of the global batch, not of rank 0's share
            torch.distributed.all_reduce(self.loss_sum)
            self.loss_sum /= world_size
        out = {"loss": float(self.loss_sum.item()) / self.steps,
               "images_per_sec": self.steps * global_batch / elapsed,
               "data_wait_frac": min(1.0, self.data_wait / elapsed)}
        self.images += self.steps * global_batch
        self.seconds += elapsed
        return out


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
