"""`data.ffcv`: the FFCV backend's settings, which check their own ranges (`problems`)."""
from __future__ import annotations

from dataclasses import dataclass

ORDERS = ("random", "quasi_random", "sequential")


@dataclass
class FfcvConfig:
    """Settings of the FFCV backend.

    Args:
        order: `random` (per-epoch shuffle, supports `distributed`), `quasi_random` (page-wise, lower RAM) or
            `sequential`.
        os_cache: read the whole file through the OS page cache (True) or with FFCV's own process cache.
        batches_ahead: batches FFCV prepares ahead.
        augment_stream: on a CUDA device, run the colour augmentation on a stream of its own (FFCV's copies ordered
            there too), handed to the training stream with an event (`pipeline.augment_stream`), so it can overlap
            the training step; off by default until measured on a GPU. No effect on the CPU.
    """

    order: str = "random"
    os_cache: bool = True
    batches_ahead: int = 3
    augment_stream: bool = False

    def problems(self) -> list[tuple[str, str, object]]:
        """`(key, what is allowed, value)` of each setting out of range, keys relative to the section."""
        checks = [(self.batches_ahead >= 1, "batches_ahead", ">= 1", self.batches_ahead),
                  (self.order in ORDERS, "order", "random, quasi_random or sequential", self.order)]
        return [(key, allowed, value) for ok, key, allowed, value in checks if not ok]
