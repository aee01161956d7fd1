"""Whether a process is alive, and a directory lock that a dead process cannot keep holding."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from blipkit.errors import BlipkitError

__all__ = ["DirectoryLock", "HOST", "process_alive"]

HOST = socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` on this machine is alive (True where that cannot be told)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """``directory/.lock``, naming the process that holds it; a lock left by a dead process on this
    machine is taken over, a live one refused with one line."""

    name = ".lock"

    def __init__(self, directory: Path, what: str) -> None:
        self.path = Path(directory) / self.name
        self.what = what

    def acquire(self) -> None:
        """Hold the lock, or raise BlipkitError naming the live process that does."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = json.dumps({"pid": os.getpid(), "host": HOST})
        for _ in range(2):
            try:
                with os.fdopen(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as handle:
                    handle.write(mine)
                return
            except FileExistsError:
                self._refuse_unless_stale()
        raise BlipkitError(f"could not lock {self.path.parent}; another process took it meanwhile, try again")

    def _refuse_unless_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            pid, host = -1, HOST  # unreadable: a writer died between creating and filling it
        if host != HOST:
            raise BlipkitError(
                f"{self.path.parent} is locked by process {pid} on {host} ({self.what}); if that run is gone, "
                f"delete {self.path}"
            )
        if pid != os.getpid() and pid > 0 and process_alive(pid):
            raise BlipkitError(
                f"{self.path.parent} is in use: process {pid} is {self.what} there; wait for it to finish or stop it, "
                "or choose another --output"
            )
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Give the lock up (only this process's own)."""
        try:
            if int(json.loads(self.path.read_text())["pid"]) == os.getpid():
                self.path.unlink()
        except (OSError, ValueError, KeyError, TypeError):
            pass
