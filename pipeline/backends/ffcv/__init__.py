"""The FFCV backend: a `.beton`, FFCV's fused decode + crop on CPU threads, colour on the device. `loader.py` reads,
`decode.py` is its seeded two-view decoder, `format.py` is the beton `byol convert` writes, `settings.py` is
`data.ffcv`."""
from __future__ import annotations

from pathlib import Path

from byolfast.pipeline.backends import Backend, Knob, Writer
from byolfast.pipeline.backends.ffcv import format as beton_format
from byolfast.pipeline.backends.ffcv.settings import FfcvConfig


def _loader(cfg, ctx):
    from byolfast.pipeline.backends.ffcv.loader import FfcvTwoViewLoader  # FFCV (numba) is imported only when asked
    return FfcvTwoViewLoader(cfg, ctx)


def _advice(cfg, device_type: str, cpu_count: int, stats: dict) -> list[str]:
    tips = []
    if cfg.num_workers < cpu_count:
        tips.append(f"raise data.num_workers (FFCV's decoding threads) from {cfg.num_workers} towards the "
                    f"{cpu_count} CPU cores")
    if device_type == "cpu":
        tips.append("on a GPU FFCV's colour augmentation runs on the device; here it shares the CPU with the model")
    return tips


def _knobs(device_type: str, ladder: tuple) -> list[Knob]:
    return [Knob("data.num_workers", ladder, True), Knob("data.ffcv.batches_ahead", (1, 2, 3, 4, 6, 8), True),
            Knob("data.ffcv.os_cache", (True, False)), Knob("data.ffcv.order", ("random", "quasi_random"))]


def _bench_path(converted: Path) -> str:
    return str(converted)   # the loader finds `ffcv/train.beton` below it


BACKEND = Backend(
    name="ffcv", summary="FFCV: a .beton, decoded and cropped on CPU threads, colour on the device",
    loader=_loader, settings=FfcvConfig,
    writer=Writer(settings=beton_format.convert_settings, complete=beton_format.complete_output,
                  write=beton_format.write_output, uses_pool=False),
    bench_path=_bench_path, advice=_advice, knobs=_knobs, requires=("ffcv",), first_start_s=30.0)
