"""The synthetic backend: random views made on the device, no data, for timing the model alone. `loader.py` holds
it."""
from __future__ import annotations

from byolfast.pipeline.backends import Backend


def _loader(cfg, ctx):
    from byolfast.pipeline.backends.synthetic.loader import SyntheticTwoViewLoader
    return SyntheticTwoViewLoader(cfg, ctx)


def _advice(cfg, device_type: str, cpu_count: int, stats: dict) -> list[str]:
    return ["the synthetic loader should cost nothing: the wait is likely host overhead (logging, syncs)"]


BACKEND = Backend(
    name="synthetic", summary="no data: random views made on the device, to time the model alone",
    loader=_loader, settings=None, writer=None, bench_path=None, advice=_advice,
    knobs=lambda device_type, ladder: [])   # nothing to tune
