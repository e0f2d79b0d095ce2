"""byolfast's data pipeline: formats, two-view loaders and BYOL's augmentations. Knows nothing of the model."""
from __future__ import annotations

from byolfast.pipeline.config import AugmentConfig, DataConfig, ViewSpec
from byolfast.pipeline.contract import Batch, DataError, LoaderContext, TwoViewLoader
from byolfast.pipeline.registry import BACKENDS


def build_two_view_loader(cfg: DataConfig, ctx: LoaderContext) -> TwoViewLoader:
    """The loader of `cfg.backend` (a name in `pipeline.registry.BACKENDS`), keeping the batch contract of
    `pipeline.contract`."""
    if cfg.backend not in BACKENDS:
        raise DataError(f"unknown data.backend {cfg.backend!r}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[cfg.backend].loader(cfg, ctx)


__all__ = ["AugmentConfig", "BACKENDS", "Batch", "DataConfig", "DataError", "LoaderContext", "TwoViewLoader",
           "ViewSpec", "build_two_view_loader"]
