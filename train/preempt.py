"""Preemption: the signals that ask a run to checkpoint and exit for requeue, and what the run leaves behind.

A handler only sets a flag; the loop checkpoints at the next step boundary, writes `PREEMPT_MARKER` in the run folder
(a requeue script's cue: torchrun exits 1, not 75, when its ranks exit 75) and exits with `EXIT_PREEMPTED`. Under
torchrun the ranks agree on the flag every `PREEMPT_CHECK_EVERY` steps (`train.distributed.FlagAgreement`), and a rank
that stands preempted ignores the next signal while it exits: torchrun sends SIGTERM to the ranks still running as
soon as the first one has exited, which killed a rank that was still closing its loader and its TensorBoard writer
(status -15, not 75). A second signal ends the process at once with status 75 (a teardown that hangs can still be
stopped; the checkpoint is on disk), and so does the interpreter's exit, before its own shutdown puts the default
handlers back.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75          # EX_TEMPFAIL: "try again" — cluster scripts requeue on it
PREEMPT_CHECK_EVERY = 5      # steps between the ranks' exchanges of a pending preemption (an async collective)
PREEMPT_MARKER = "preempted.json"   # in the run folder while the run stands preempted: a requeue script's cue


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with `EXIT_PREEMPTED`."""

    def __init__(self, step: int, path: Optional[Path]):
        super().__init__(EXIT_PREEMPTED)
        self.step, self.path = step, path


class PreemptFlag:
    """Signal handlers that only set a flag; the loop checkpoints at the next step boundary."""

    def __init__(self, names: list[str]):
        self.signum: Optional[int] = None
        self.holding, self.held = False, 0
        self._previous = {}
        for name in names:
            sig = getattr(signal, name)
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:   # not the main thread (e.g. inside a test runner's worker thread)
                pass

    def _handle(self, signum, frame) -> None:
        if self.holding:
            self.held += 1
            name = signal.Signals(signum).name
            if self.held > 1:
                log.warning("received %s again while exiting for requeue: exiting now", name)
                exit_preempted()
            log.info("received %s while exiting for requeue: ignored (another one exits at once)", name)
            return
        if self.signum is None:
            log.warning("received %s: finishing this step, then writing a checkpoint", signal.Signals(signum).name)
        self.signum = signum

    def hold(self) -> None:
        """The checkpoint is written and the process exits: keep the handlers, ignore the next signal, exit with
        `EXIT_PREEMPTED` at once on the one after. The interpreter's own shutdown sets the handlers back to the
        default (a signal then kills), so the process leaves at its first exit handler, once its non-daemon threads
        have finished, without that shutdown."""
        self.holding = True
        atexit.register(exit_preempted)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def exit_preempted() -> None:
    """Flush the logs and the standard streams, and end the process with `EXIT_PREEMPTED` now."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_PREEMPTED)


def stand_preempted(run_dir: Path, step: int, checkpoint: Optional[Path], flag: PreemptFlag, is_main: bool) -> None:
    """Write the requeue marker (rank 0) and raise `Preempted`: the checkpoint of `step` is already on disk."""
    if is_main:
        from byolfast.pipeline.storage import write_json_atomic
        signame = signal.Signals(flag.signum).name if flag.signum is not None else None
        write_json_atomic(Path(run_dir) / PREEMPT_MARKER, {"step": step, "checkpoint": str(checkpoint),
                                                           "signal": signame, "exit_status": EXIT_PREEMPTED})
    log.warning("preempted at step %d: checkpoint written, exiting with status %d for requeue", step, EXIT_PREEMPTED)
    raise Preempted(step, checkpoint)
