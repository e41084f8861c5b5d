"""One driver per run folder: an exclusive ``flock`` on ``<results>/<run>/.lock``.

The kernel drops a flock when its holder dies, SIGKILL included, so a lock is never left blocking
by a dead driver on this machine. The file also holds the holder's host, pid and start time: for
the message a second driver prints, and for the stale-lock rule. A lock acquired over a file that
still names a driver (one that died without releasing it) is taken over with a note where that
driver ran on this host (it is provably gone: it held no lock); where it ran on another host, whose
locks a shared file system may not show here, the driver refuses and says which file to remove
once that driver is known to be gone.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another driver holds the run folder; the message names its host and pid."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class RunLock:
    """``with RunLock(run_dir) as lock:`` -- raises RunLocked where another driver holds it;
    ``lock.note`` says when a stale lock was taken over."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.note: str | None = None

    @staticmethod
    def _describe(holder: dict) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        return f"pid {holder.get('pid')} on host {holder.get('host')} (started {since})"

    def _holder(self) -> dict:
        os.lseek(self.fd, 0, os.SEEK_SET)
        text = os.read(self.fd, 4096).decode(errors="replace").strip()
        if not text:
            return {}
        try:
            holder = json.loads(text)
        except ValueError:
            return {"host": "?", "pid": "?", "raw": text[:200]}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locks = True
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    locks = False  # a file system without locks (ENOLCK...): the file's content decides
                else:
                    holder = self._holder()
                    raise RunLocked(f"{self.path.parent} is in use by another driver: "
                                    f"{self._describe(holder)}; wait for it to finish, or give this "
                                    f"run another --run name") from None
            holder, me = self._holder(), socket.gethostname()
            if holder:
                if holder.get("host") != me or (not locks and pid_alive(int(holder.get("pid", 0) or 0))):
                    raise RunLocked(
                        f"{self.path} names a driver that may still run: {self._describe(holder)}; "
                        f"this host ({me}) cannot see its lock. Once that driver is gone, remove "
                        f"{self.path} and run again")
                self.note = (f"took over the lock of a driver that is gone: {self._describe(holder)}"
                             + ("" if not pid_alive(int(holder.get("pid", 0) or 0)) else
                                "; that pid is alive but holds no lock (a reused pid)"))
            record = json.dumps({"host": me, "pid": os.getpid(), "started": time.time()}).encode()
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, record, 0)
            os.fsync(self.fd)
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise
        return self

    def release(self) -> None:
        """Empty the file (no driver named), then drop the lock. The file stays: removing it would
        let a driver that opened it a moment before lock an unlinked file while a third locks a new one."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        finally:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
