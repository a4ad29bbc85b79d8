"""Stopping a training run cleanly on SIGINT (Ctrl-C) or SIGTERM (schedulers, containers,
``torchrun``): the iteration in flight is abandoned, the last completed one is saved, and
the command exits with the conventional status (130 / 143) and no traceback.

A signal that arrives while an iteration runs (``interruptible``) stops it at once; one
that arrives while the runner writes its logs or a checkpoint waits until the write is
done. The first signal also restores the previous handlers, so a second Ctrl-C stops at
once (the checkpoint on disk, written atomically, is kept either way). A rank of a
data-parallel job keeps its handler instead (``escalate=False``): torchrun passes the
signal it got on to every rank right after the terminal's own, which must not cut the
save short, and it escalates to SIGKILL itself after its shutdown timeout (30 s).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest(Exception):
    """Raised inside an interruptible region when a stop signal arrives."""


class TrainingStopped(Exception):
    """Training stopped on a signal after saving its last completed iteration."""

    def __init__(self, signum: int, global_step: int, run_dir: Path) -> None:
        self.signum, self.global_step, self.run_dir = signum, global_step, Path(run_dir)
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {global_step:,} (the last "
            f"completed iteration is saved); resume with: compressm-rl train --resume {run_dir}"
        )

    def __reduce__(self):  # whole across a process boundary (a pool's worker raising it)
        return type(self), (self.signum, self.global_step, self.run_dir)

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process a signal ended."""
        return 128 + self.signum


class StopOnSignals:
    """``with StopOnSignals() as stop:`` turns SIGINT and SIGTERM into a stop request.

    ``stop.signum`` is the first signal received (None until then). Handlers are only
    installed from the main thread (Python delivers signals there); elsewhere the context
    does nothing and the process reacts to signals as it otherwise would.
    """

    def __init__(self, escalate: bool = True) -> None:
        self.escalate = escalate  # a second signal stops at once
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._interruptible = False

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is None:
            self.signum = signum
        if self.escalate:
            self._restore()  # a second signal acts at once
        if self._interruptible:
            raise StopRequest(signum)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A region a stop may abandon midway (its effects are discarded by the caller)."""
        if self.signum is not None:
            raise StopRequest(self.signum)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False
