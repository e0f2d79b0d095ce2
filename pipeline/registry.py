"""The one list of loader backends: name -> `Backend` record (`pipeline.backends`).

The config's validation, `build_two_view_loader`, `byol convert`'s formats, `byol bench`'s backends and the
profiler's advice all read this dict. A new backend is a package under `pipeline/backends/` with its `BACKEND` record
and one line here (and, if it has settings, its section as a field of `DataConfig`). A plain dict: a test may add
an entry (`monkeypatch.setitem`).
"""
from __future__ import annotations

from byolfast.pipeline.backends import Backend
from byolfast.pipeline.backends import dali, ffcv, synthetic
from byolfast.pipeline.backends import torch as torch_backend   # not the torch library

BACKENDS: dict[str, Backend] = {
    dali.BACKEND.name: dali.BACKEND,
    ffcv.BACKEND.name: ffcv.BACKEND,
    torch_backend.BACKEND.name: torch_backend.BACKEND,
    synthetic.BACKEND.name: synthetic.BACKEND,
}


def formats() -> tuple[str, ...]:
    """The backends `byol convert` writes a format for, in registry order."""
    return tuple(name for name, b in BACKENDS.items() if b.writer is not None)


def bench_backends() -> tuple[str, ...]:
    """The backends `byol bench` measures as loaders: those that read images."""
    return tuple(name for name, b in BACKENDS.items() if b.bench_path is not None)
