"""The torch backend: an ImageFolder tree read by PIL and torchvision v2 transforms in `DataLoader` workers (the
reference the other backends are checked against). `loader.py` holds it."""
from __future__ import annotations

from pathlib import Path

from byolfast.pipeline.backends import Backend, Knob


def _loader(cfg, ctx):
    from byolfast.pipeline.backends.torch.loader import TorchTwoViewLoader
    return TorchTwoViewLoader(cfg, ctx)


def _advice(cfg, device_type: str, cpu_count: int, stats: dict) -> list[str]:
    tips = ["switch to data.backend=dali (or ffcv): the torch backend decodes and augments each image with PIL in "
            "Python workers, the slowest of the three"]
    if cfg.num_workers < cpu_count:
        tips.append(f"raise data.num_workers from {cfg.num_workers} towards the {cpu_count} CPU cores")
    return tips


def _knobs(device_type: str, ladder: tuple) -> list[Knob]:
    return [Knob("data.num_workers", ladder, True)]   # not 0: loading in the training process never overlaps


def _bench_path(folder: Path) -> str:
    return str(folder)


BACKEND = Backend(
    name="torch", summary="torchvision: an ImageFolder tree through PIL in DataLoader workers (the reference)",
    loader=_loader, settings=None, writer=None, bench_path=_bench_path, advice=_advice, knobs=_knobs)
