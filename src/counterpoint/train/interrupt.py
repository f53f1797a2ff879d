"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM: finish the step, save a checkpoint, exit.

A signal only sets a flag; the training loop checks it once per step, together with the other ranks (so all
stop at the same step), saves a checkpoint there and raises :class:`TrainingInterrupted`. A second Ctrl-C
while that happens interrupts at once, as Python normally does.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped on a signal after saving a checkpoint; the message says where and how to go on."""


class StopOnSignal:
    """Context manager: while active, SIGINT and SIGTERM set :attr:`requested` instead of ending the process.

    Outside the main thread (where Python cannot install handlers) it does nothing, and a signal the process
    was started ignoring (``nohup``, a background job of a script) stays ignored, as the shell meant.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.requested = True
        print(f"\ncounterpoint: {signal.Signals(signum).name} received; stopping after this step and saving a "
              f"checkpoint (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
