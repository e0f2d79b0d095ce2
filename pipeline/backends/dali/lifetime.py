"""How long the DALI loader's objects live: a batch's buffers (`StreamHold`), the next epoch's pipeline
(`BuildAhead`) and a finished epoch's pipeline (`drop_in_background`).

DALI fixes an epoch's reader input and seeds when its pipeline is built, so the loader builds one per epoch; these
keep that off the consumer's path: the next pipeline is built and primed in a background thread while the last one is
consumed, and the last one is torn down in another. Both threads work on the consumer's CUDA device (a new thread
starts on device 0, where it would create a context of its own on every other rank's machine).
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)


class StreamHold:
    """Keeps DALI's outputs alive until the device work queued after them has run.

    With the dynamic executor, the iterator hands out DALI's own buffers without a copy (DLPack), and DALI may reuse a
    buffer as soon as the last torch tensor viewing it is dropped on the host, while kernels that read it (the cast to
    the training dtype, the step itself) can still be queued on the GPU. Each batch's outputs are held, with an event
    recorded on torch's stream when the consumer asks for the next batch, and let go once that event has passed;
    `drain` waits for the rest (at the end of an epoch). On the CPU, work runs when it is issued: nothing is held.

    Args:
        device: the consumer's device.
        new_event: makes an event with `record()`, `query()` and `synchronize()` (CUDA events by default).
    """

    def __init__(self, device: torch.device, new_event=None):
        self.active = device.type == "cuda"
        self.new_event = new_event or (lambda: torch.cuda.Event())
        self._held: collections.deque = collections.deque()

    def hold(self, outputs: object) -> None:
        if not self.active:
            return
        event = self.new_event()
        event.record()   # on the current stream of the current device (the trainer sets it to its own)
        self._held.append((event, outputs))
        while self._held and self._held[0][0].query():
            self._held.popleft()

    def drain(self) -> None:
        for event, _ in self._held:
            event.synchronize()
        self._held.clear()

    def __len__(self) -> int:
        return len(self._held)


def with_index(device: torch.device) -> torch.device:
    """A CUDA device with its index: the calling thread's current device where `device` names none."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


class BuildAhead:
    """`open_fn()` run in a background thread: an epoch's pipeline built and primed while the last one is consumed.

    On a GPU the thread runs on a stream of its own on the consumer's device, and `result()` makes the stream current
    then (the consumer's) wait for what the thread queued: the first batch's work neither waits behind nor holds up the
    training work of the epoch still running. `result()` waits for the thread and returns what `open_fn()` returned,
    or raises what it raised, once: it keeps no reference to either afterwards (an error's traceback holds the
    pipeline it failed in).
    """

    def __init__(self, open_fn: Callable[[], object], key: tuple, device: torch.device):
        self.key = key
        self._open = open_fn
        self._device = with_index(device) if device.type == "cuda" else None
        self._event: Optional[torch.cuda.Event] = None
        self._value: object = None
        self._error: Optional[BaseException] = None
        # not a daemon: the interpreter waits for a build in flight instead of exiting inside DALI's code
        self._thread = threading.Thread(target=self._run, name=f"dali-build-ahead-{key}")
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._device is None:
                self._value = self._open()
                return
            torch.cuda.set_device(self._device)
            side = torch.cuda.Stream(self._device)
            with torch.cuda.stream(side):
                self._value = self._open()
                self._event = torch.cuda.Event()
                self._event.record(side)
        except BaseException as e:   # handed to the consumer by result()
            self._error = e

    def result(self):
        self._thread.join()
        value, error, self._value, self._error = self._value, self._error, None, None
        if error is not None:
            raise error
        if self._event is not None:
            torch.cuda.current_stream(self._device).wait_event(self._event)
        return value


def drop_in_background(refs: list, device: torch.device) -> None:
    """Empty `refs` (the last references to a finished epoch's pipeline and iterator) in a background thread: a DALI
    pipeline's teardown, which joins its threads and frees its buffers, took 0.085 s of the consumer's time at every
    epoch's start (on the CPU). Not a daemon: the interpreter waits for it before it exits."""
    device = with_index(device) if device.type == "cuda" else None

    def drop() -> None:
        if device is not None:
            torch.cuda.set_device(device)
        refs.clear()

    threading.Thread(target=drop, name="dali-drop").start()
