"""One runner per output directory: an exclusive lock file that recognises a stale lock of a dead process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from .provenance import now


class LockError(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process on this host (a zombie, killed but not yet reaped, is not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class RunLock:
    """``with RunLock(out_dir):`` holds ``<out_dir>/.proxygap.lock`` (O_EXCL create, pid + host inside).

    A lock whose process is gone (same host) is stale: it is replaced, with a note on stderr.
    """

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".proxygap.lock"

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "start": now()}, f)
            return self
        raise LockError(f"could not take the lock {self.path}")

    def _check_stale(self) -> None:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        pid, host = info.get("pid"), info.get("host")
        if isinstance(pid, int) and host == socket.gethostname() and not _alive(pid):
            print(f"proxygap: removing stale lock of dead process {pid} ({self.path})", flush=True)
            self.path.unlink(missing_ok=True)
            return
        if not info:
            self.path.unlink(missing_ok=True)  # empty lock: its writer died between create and write
            return
        raise LockError(f"another runner (pid {pid} on {host}, started {info.get('start', '?')}) is working in "
                        f"{self.path.parent}; wait for it to finish, or, if you are sure it is gone, delete "
                        f"{self.path}")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
