"""An advisory lock on an output directory (DIR/.lock), so two `compare` runs never journal into
the same DIR at once (each rewrites results.json from its own rows: the later writer would drop
the other's cells).

The lock file is created with O_CREAT | O_EXCL and held with fcntl.flock for the life of the run;
it records {"pid", "host", "started"}. A second run refuses at once (OutputLockedError naming the
holder). A lock file left by a run that died (its flock is free and, on this host, its pid is
gone) is taken over with a warning; one left by another host is refused (we cannot tell whether
that run still lives), with the path to delete.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from typing import Optional

from widetopo.errors import OutputLockedError

try:
    import fcntl
except ImportError:  # not POSIX: the O_EXCL file and the pid check alone
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a zombie (exited, not yet reaped) is gone too
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown run (the lock file is empty or unreadable)"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {when}"


def _read(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class OutputLock:
    """`with OutputLock(dir):` holds DIR/.lock (see the module docstring); released (file
    removed) on exit, also after an exception."""

    def __init__(self, out_dir):
        self.path = os.path.join(os.fspath(out_dir), LOCK_NAME)
        self.fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        for _ in range(5):  # retried only when the file vanished or was replaced under us
            created = True
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                created = False
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    continue
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise OutputLockedError(
                    f"{os.path.dirname(self.path) or '.'} is in use by another run ({_describe(holder)}); wait for it "
                    f"to finish or use another output directory", holder) from None
            try:
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)  # released and removed between our open and flock: start over
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            if not created:
                holder = _read(fd)
                here = socket.gethostname()
                pid = holder.get("pid")
                if holder and holder.get("host") != here:
                    os.close(fd)
                    raise OutputLockedError(
                        f"{os.path.dirname(self.path)} is locked by {_describe(holder)}; from host {here} it cannot "
                        f"be told whether that run still lives. If it does not, delete {self.path}", holder)
                if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
                    os.close(fd)  # alive without holding the flock (a filesystem without flock): refuse
                    raise OutputLockedError(
                        f"{os.path.dirname(self.path)} is in use by another run ({_describe(holder)}); wait for it "
                        f"to finish or use another output directory", holder)
                logger.warning("taking over the stale lock %s left by %s (that process is gone)", self.path,
                               _describe(holder))
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
            os.fsync(fd)
            self.fd = fd
            return self
        raise OutputLockedError(f"could not lock {self.path}: it keeps being replaced by another run", {})

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # removed while still flocked, so a waiter sees a new file
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
