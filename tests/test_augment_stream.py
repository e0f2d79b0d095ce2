"""AugmentStream: a no-op on the CPU; on CUDA, the side stream waits, runs, records an event the consumer waits for,
and marks the tensors crossing streams (checked here with a fake `torch.cuda`, for real by the `gpu` test)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from byolfast.pipeline.augment_stream import AugmentStream


def test_cpu_path_is_a_no_op():
    s = AugmentStream(torch.device("cpu"))
    x = torch.ones(2, 3)
    with s.side(x):
        y = x * 2
    assert s.stream is None and s.hand_over(y, None)[0] is y


class _Log:
    def __init__(self):
        self.calls = []


class _FakeStream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.calls.append((self.name, "wait_stream", other.name))

    def wait_event(self, event):
        self.log.calls.append((self.name, "wait_event", event.name))


class _FakeEvent:
    def __init__(self, log):
        self.log, self.name = log, "event"

    def record(self, stream):
        self.log.calls.append(("event", "record", stream.name))


class _FakeCuda:
    def __init__(self, log):
        self.log = log
        self.consumer = _FakeStream(log, "consumer")

    def Stream(self, device):   # noqa: N802 (torch.cuda's name)
        return _FakeStream(self.log, "side")

    def current_stream(self, device):
        return self.consumer

    def Event(self):   # noqa: N802
        return _FakeEvent(self.log)

    @contextlib.contextmanager
    def stream(self, s):
        self.log.calls.append((s.name, "enter", None))
        yield
        self.log.calls.append((s.name, "exit", None))


class _Marked:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def record_stream(self, s):
        self.log.calls.append((self.name, "record_stream", s.name))


def test_cuda_protocol_with_a_fake_device():
    log = _Log()
    s = AugmentStream(torch.device("cuda", 0), cuda=_FakeCuda(log))
    with s.side(_Marked(log, "input")):
        log.calls.append(("work", "queued", None))
    out = _Marked(log, "output")
    assert s.hand_over(out)[0] is out
    assert log.calls == [("side", "wait_stream", "consumer"), ("input", "record_stream", "side"),
                         ("side", "enter", None), ("work", "queued", None), ("side", "exit", None),
                         ("event", "record", "side"), ("consumer", "wait_event", "event"),
                         ("output", "record_stream", "consumer")]


def test_a_producer_ordered_on_the_side_stream_is_not_waited_behind_the_consumer():
    """`current()` makes the side stream current with no wait (FFCV's iterator is created there); `side(after_consumer
    =False)` then queues the augmentation without waiting for the consumer's queued step; the hand-over is as before."""
    log = _Log()
    s = AugmentStream(torch.device("cuda", 0), cuda=_FakeCuda(log))
    with s.current():
        log.calls.append(("producer", "created", None))
    with s.side(after_consumer=False):
        log.calls.append(("work", "queued", None))
    s.hand_over(_Marked(log, "output"))
    assert log.calls == [("side", "enter", None), ("producer", "created", None), ("side", "exit", None),
                         ("side", "enter", None), ("work", "queued", None), ("side", "exit", None),
                         ("event", "record", "side"), ("consumer", "wait_event", "event"),
                         ("output", "record_stream", "consumer")]
    cpu = AugmentStream(torch.device("cpu"))
    with cpu.current(), cpu.side(after_consumer=False):
        pass
    assert cpu.stream is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_hand_over_gives_the_same_values():
    s = AugmentStream(torch.device("cuda"))
    x = torch.rand(64, 3, 32, 32, device="cuda")
    with s.side(x):
        y = (x * 2).sin()
    (y,) = s.hand_over(y)
    torch.testing.assert_close(y.cpu(), (x.cpu() * 2).sin())
