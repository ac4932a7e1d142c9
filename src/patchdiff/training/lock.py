"""One process per run directory: an OS file lock that a dead process cannot leave behind.

`fcntl.flock` locks belong to the open file; the kernel drops them when the holder exits, however it
exits (kill -9 included), so there is no stale lock to clean up. The lock file holds the holder's pid
and host, which the refusal names.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    pass


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.file = None

    def acquire(self) -> RunLock:
        f = open(self.path, "a+")  # noqa: SIM115 (held open for the run: the lock lives with the file)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockedError(
                f"{self.path.parent} is in use by {holder}; wait for it to finish or stop it first"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self.file = f
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
