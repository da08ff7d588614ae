"""One runner per output directory: an exclusive ``flock`` on ``<out_dir>/.proxygap.lock``.

The kernel holds the lock for the process and drops it when the process dies, SIGKILL included, so two
runners racing for a directory cannot both win, and a dead runner's lock never blocks anyone. The file also
records pid, host and start time: a refusal can then name who holds the lock, and a file left by a dead
runner is reported as stale when it is taken over.
"""

from __future__ import annotations

import fcntl
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


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        info = json.loads(os.read(fd, 65536) or b"{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


class RunLock:
    """``with RunLock(out_dir):`` holds ``<out_dir>/.proxygap.lock`` or raises :class:`LockError`.

    Taking it: open (creating) the file, ``flock(LOCK_EX | LOCK_NB)``, then check that the path still names
    the inode we locked (a holder that just finished unlinks it; we then retry on the new file). A file
    that names a live process on this host other than us, or any other host, is still refused: it is a
    runner that does not take the flock (an older proxygap, or a node whose file system drops flocks).
    Releasing: unlink the path while still holding the lock, then close.
    """

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".proxygap.lock"
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read(fd)
                os.close(fd)
                raise LockError(self._busy(info)) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._take_over(fd)
            self.fd = fd
            return self
        raise LockError(f"could not take the lock {self.path} (it kept being replaced)")

    def _take_over(self, fd: int) -> None:
        info = _read(fd)
        pid, host = info.get("pid"), info.get("host")
        if info and (host != socket.gethostname() or (isinstance(pid, int) and pid != os.getpid() and _alive(pid))):
            os.close(fd)
            raise LockError(self._busy(info))
        if isinstance(pid, int):
            print(f"proxygap: replacing the stale lock of dead process {pid} ({self.path})", flush=True)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": now()}).encode())
        os.fsync(fd)

    def _busy(self, info: dict) -> str:
        return (f"another runner (pid {info.get('pid', '?')} on {info.get('host', '?')}, started "
                f"{info.get('start', '?')}) is working in {self.path.parent}; wait for it to finish, or, if you "
                f"are sure it is gone, delete {self.path}")

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
