"""byolfast's data pipeline: formats, two-view loaders and BYOL's augmentations. Knows nothing of the model."""
from __future__ import annotations

from typing import Callable

from byolfast.pipeline.config import AugmentConfig, DataConfig, ViewSpec
from byolfast.pipeline.contract import Batch, DataError, LoaderContext, TwoViewLoader


def _dali(cfg: DataConfig, ctx: LoaderContext) -> TwoViewLoader:
    from byolfast.pipeline.dali_loader import DaliTwoViewLoader  # DALI is imported only when asked for
    return DaliTwoViewLoader(cfg, ctx, exact_hue=cfg.dali.exact_hue)


def _ffcv(cfg: DataConfig, ctx: LoaderContext) -> TwoViewLoader:
    from byolfast.pipeline.ffcv_loader import FfcvTwoViewLoader  # FFCV (numba) is imported only when asked for
    return FfcvTwoViewLoader(cfg, ctx)


def _torch(cfg: DataConfig, ctx: LoaderContext) -> TwoViewLoader:
    from byolfast.pipeline.torch_loader import TorchTwoViewLoader
    return TorchTwoViewLoader(cfg, ctx)


def _synthetic(cfg: DataConfig, ctx: LoaderContext) -> TwoViewLoader:
    from byolfast.pipeline.synthetic import SyntheticTwoViewLoader
    return SyntheticTwoViewLoader(cfg, ctx)


LOADERS: dict[str, Callable[[DataConfig, LoaderContext], TwoViewLoader]] = {
    "dali": _dali,
    "ffcv": _ffcv,
    "torch": _torch,
    "synthetic": _synthetic,
}


def build_two_view_loader(cfg: DataConfig, ctx: LoaderContext) -> TwoViewLoader:
    """The loader of `cfg.backend`, keeping the batch contract of `pipeline.contract`."""
    if cfg.backend not in LOADERS:
        raise DataError(f"unknown data.backend {cfg.backend!r}: choose one of {', '.join(LOADERS)}")
    return LOADERS[cfg.backend](cfg, ctx)


__all__ = ["AugmentConfig", "Batch", "DataConfig", "DataError", "LOADERS", "LoaderContext", "TwoViewLoader",
           "ViewSpec", "build_two_view_loader"]
