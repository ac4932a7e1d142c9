"""One process per run directory: an OS file lock that a dead process cannot leave behind.

A POSIX record lock (`fcntl.lockf`) belongs to the process that took it: the kernel drops it when that
process exits, however it exits (kill -9 included), so there is no stale lock to clean up. Unlike a
`flock` lock, which belongs to the open file, it is not shared with forked children: DataLoader workers
that outlive a killed trainer by a few seconds do not keep the run locked. Because closing any
descriptor of the file in the holding process drops the lock, this process never opens the file a
second time while it holds it (a second `acquire` here is refused from memory). The lock file holds the
holder's pid and host, which the refusal names.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = "run.lock"
_held: set[Path] = set()  # lock files this process holds


class RunLockedError(RuntimeError):
    pass


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.file = None

    def _refuse(self, holder: str):
        return RunLockedError(
            f"{self.path.parent} is in use by {holder}; wait for it to finish or stop it first"
        )

    def acquire(self) -> RunLock:
        key = self.path.resolve()
        if key in _held:
            raise self._refuse(f"pid {os.getpid()} on {socket.gethostname()} (this process)")
        f = open(self.path, "a+")  # noqa: SIM115 (held open for the run: the lock lives with the file)
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise self._refuse(holder) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self.file, self.key = f, key
        _held.add(key)
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.lockf(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
            _held.discard(self.key)
