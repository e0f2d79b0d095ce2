"""The consumer's wait at each epoch start of the DALI loader, with the next epoch's pipeline built ahead and without.

    python -m byolfast.benchmarks.epoch_start [--data data/bench] [--epochs 4] [--step-ms 20] [--out epoch_start.json]

DALI fixes an epoch's file list, tar order and seeds when its pipeline is built, so each epoch has a pipeline of its
own. Without `data.dali.build_ahead` the consumer waited, at every epoch start, for that build and the first batch
(and, before, for the last pipeline's teardown). Both settings run in one process over the benchmark JPEGs, in turn
(off, on, off, on ...), with a consumer that sleeps `--step-ms` per batch in place of a training step. The wait for
each epoch's first batch (epochs after the first) is compared with the median wait for any other batch, and the
consumer's whole wait per epoch with both (the pipeline built ahead shares the CPU with the running one while it is
built and primed).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from byolfast.benchmarks import bench_data
from byolfast.benchmarks.environment import env_info

log = logging.getLogger(__name__)


def epoch_waits(loader, epochs: int, step_s: float) -> tuple[list[float], list[float], list[float]]:
    """Seconds the consumer waited for each epoch's first batch, for every other batch, and in all per epoch (epochs
    1 on: epoch 0 builds the first pipeline in any case)."""
    firsts, others, totals = [], [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        t, total = time.perf_counter(), 0.0
        for i, _ in enumerate(loader):
            waited = time.perf_counter() - t
            total += waited
            if i == 0 and epoch > 0:
                firsts.append(waited)
            elif epoch > 0:
                others.append(waited)
            time.sleep(step_s)
            t = time.perf_counter()
        if epoch > 0:
            totals.append(total + time.perf_counter() - t)   # and the wait for the epoch's end
    return firsts, others, totals


def main(argv: list[str] | None = None) -> dict:
    from byolfast.pipeline.backends.dali.loader import DaliTwoViewLoader
    from byolfast.pipeline.backends.dali.settings import DaliConfig
    from byolfast.pipeline.config import DataConfig
    from byolfast.pipeline.contract import LoaderContext

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/bench")
    p.add_argument("--images", type=int, default=768)
    p.add_argument("--photo-size", default="320x240")
    p.add_argument("--size", type=int, default=96, help="view side in pixels")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="DALI's CPU threads")
    p.add_argument("--epochs", type=int, default=4, help="per turn; the first epoch of each is not counted")
    p.add_argument("--repeats", type=int, default=2, help="turns of each setting, alternating")
    p.add_argument("--step-ms", type=float, default=20.0, help="the consumer's time per batch")
    p.add_argument("--decoder", default="mixed", choices=("mixed", "cpu"))
    p.add_argument("--out", default="epoch_start.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = bench_data.build_bench_images(a.data, a.images, size=bench_data.photo_size(a.photo_size))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ctx = LoaderContext(device=device, batch_size=a.batch, seed=0)
    waits: dict[str, dict[str, list[float]]] = {}
    for turn in range(a.repeats):
        for build_ahead in (0, DaliConfig.build_ahead):
            cfg = DataConfig(backend="dali", path=str(folder), image_size=a.size,
                             dali=DaliConfig(num_threads=a.threads, decoder=a.decoder, build_ahead=build_ahead))
            loader = DaliTwoViewLoader(cfg, ctx)
            try:
                firsts, others, totals = epoch_waits(loader, a.epochs, a.step_ms / 1000)
                stats = loader.stats()
            finally:
                loader.close()
            rec = waits.setdefault(f"build_ahead={build_ahead}", {"epoch_start_s": [], "other_batches_s": [],
                                                                         "waited_per_epoch_s": []})
            rec["epoch_start_s"] += firsts
            rec["other_batches_s"] += others
            rec["waited_per_epoch_s"] += totals
            log.info("turn %d, build_ahead=%d: epoch-start waits %s s, other batches median %.4f s, decoder %s",
                     turn + 1, build_ahead, [round(f, 4) for f in firsts], statistics.median(others),
                     stats["decoder"])
    summary = {k: {"epoch_start_median_s": statistics.median(v["epoch_start_s"]),
                   "other_batches_median_s": statistics.median(v["other_batches_s"]),
                   "waited_per_epoch_median_s": statistics.median(v["waited_per_epoch_s"]), **v} for k, v in waits.items()}
    off, on = summary["build_ahead=0"], summary[f"build_ahead={DaliConfig.build_ahead}"]
    result = {"env": env_info(device), "protocol": vars(a), "decoder": stats["decoder"], "settings": summary,
              "epoch_start_wait_ratio_off_over_on": off["epoch_start_median_s"] / on["epoch_start_median_s"]}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"DALI ({stats['decoder']}), median wait at an epoch start: {off['epoch_start_median_s'] * 1e3:.1f} ms "
          f"built when the epoch starts, {on['epoch_start_median_s'] * 1e3:.1f} ms built ahead "
          f"({result['epoch_start_wait_ratio_off_over_on']:.0f}x less); any other batch "
          f"{off['other_batches_median_s'] * 1e3:.1f} / {on['other_batches_median_s'] * 1e3:.1f} ms; waited per epoch "
          f"{off['waited_per_epoch_median_s']:.3f} / {on['waited_per_epoch_median_s']:.3f} s")
    return result


if __name__ == "__main__":
    main()
