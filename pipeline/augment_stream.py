"""The device augmentation on its own CUDA stream, handed to the training stream with an event.

`AugmentStream.side()` makes the augmentation's stream current for the work queued inside it (after that stream waits
for the work the inputs depend on); `hand_over(*tensors)` records an event on it, makes the consumer's stream wait
for that event, and marks each tensor with `record_stream(consumer)`, so the caching allocator does not reuse its
memory while the consumer may still read it. On the CPU (and for any non-CUDA device) both are no-ops: the same
tensors, the same order.

For the augmentation to overlap the training step, its inputs must not be ordered behind that step: `side()` waits
for the consumer stream, which is right when the inputs were produced there, but serialises behind the queued step.
A loader whose copies run on their own stream (FFCV's `EpochIterator` waits with the stream current when it was
created, and records there the events that free its buffers) creates that iterator inside `current()`, so the copies
are waited for on the side stream only, and augments inside `side(after_consumer=False)`: the FFCV backend does so
with `data.ffcv.augment_stream`.

The CUDA calls go through `self._cuda` (the `torch.cuda` module), so a test without a device can hand in a fake and
check the protocol; the real CUDA path is exercised by the `gpu`-marked test.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


class AugmentStream:
    """A side stream for one loader's device augmentation, on `device` (a no-op unless it is a CUDA device)."""

    def __init__(self, device: torch.device, cuda=None):
        self.device = torch.device(device)
        self._cuda = cuda if cuda is not None else torch.cuda
        # CUDA only: a stream of its own; None elsewhere, where every method passes its arguments through.
        self.stream = self._cuda.Stream(device=self.device) if self.device.type == "cuda" else None
        self._consumer = None

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """The side stream current for the block, with no wait: for creating a producer (FFCV's `EpochIterator`)
        whose copies must be ordered on the side stream, not the consumer's."""
        if self.stream is None:
            yield
            return
        with self._cuda.stream(self.stream):
            yield

    @contextlib.contextmanager
    def side(self, *inputs: torch.Tensor, after_consumer: bool = True) -> Iterator[None]:
        """Queue the work inside on the side stream, after the consumer stream's work so far (which produced or
        ordered the inputs; `after_consumer=False`: the inputs were ordered on the side stream itself, so the
        augmentation need not wait for the training step queued there); each input is marked as used by the side
        stream."""
        if self.stream is None:
            yield
            return
        # CUDA only from here.
        self._consumer = self._cuda.current_stream(self.device)
        if after_consumer:
            self.stream.wait_stream(self._consumer)
        for t in inputs:
            t.record_stream(self.stream)
        with self._cuda.stream(self.stream):
            yield

    def hand_over(self, *outputs: Optional[torch.Tensor]) -> tuple:
        """The consumer stream waits for the side stream's work on `outputs` (an event, no host sync); each output is
        marked as used by the consumer. Returns `outputs` unchanged."""
        if self.stream is None:
            return outputs
        # CUDA only from here.
        consumer = self._consumer if self._consumer is not None else self._cuda.current_stream(self.device)
        event = self._cuda.Event()
        event.record(self.stream)
        consumer.wait_event(event)
        for t in outputs:
            if t is not None:
                t.record_stream(consumer)
        return outputs
