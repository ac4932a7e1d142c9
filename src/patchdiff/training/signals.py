"""Stop requests: SIGTERM (preemption), SIGINT (Ctrl-C) and SIGUSR1 (e.g. a scheduler's warning).

A handler only records the signal; the loop looks at the record at the next step boundary, writes
the training state and leaves with `RunInterruptedError`, which the CLI turns into one line and exit code
128 + signal number (130 for Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1), as a shell reports a run
killed by that signal, so job scripts and torchrun see a failed run that can be resumed.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class RunInterruptedError(Exception):
    """The run stopped on request after writing its state; `exit_code` is 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequests:
    """Installs the handlers while active (main thread only; elsewhere it never fires)."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = self.signum or signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`: the stop signals are the main process's decision.

    `kill -TERM -PGID` (Slurm preemption) and Ctrl-C reach the whole process group; a worker killed by
    one makes the DataLoader raise in the main process before it can write the state. Ignoring them
    here overrides torch's worker handlers (installed before this runs); the main process stops at the
    next step and shuts its workers down itself."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
