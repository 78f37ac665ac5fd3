"""One builder per native build folder at a time, and never a wait on a dead one.

torch's extension builder guards a build folder with a bare `lock` file (created with O_EXCL, removed
when the build ends). A process killed mid-build leaves that file behind, and every later start
waits on it forever. kiln therefore takes its own lock first: an `flock` on `kiln_build.lock`, which
the kernel releases when its holder dies, so it cannot go stale. The file's text names the holder
(pid, host, start time) so a waiter can say whom it waits for.

Invariant: every kiln process that builds or loads in a folder holds this lock while doing so. So a
torch `lock` file found while holding it was left by a process that died mid-build: it is removed
with a warning (the build then starts over, ninja reusing whatever objects were finished).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from kiln.errors import KilnError

LOCK_NAME = "kiln_build.lock"
TORCH_LOCK_NAME = "lock"  # torch.utils.cpp_extension's FileBaton in the build directory


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def is_locked(folder: Path) -> bool:
    """Whether a live process holds `folder`'s build lock now (a build or load in progress)."""
    path = folder / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the file drops the probe's own lock
    return False


class BuildLock:
    """Exclusive right to build or load in `folder`, held across processes (a context manager).

    Waits while a live process holds it (saying so once on stderr), up to `timeout_s`, then raises a
    KilnError naming the holder. Never waits on a dead holder."""

    def __init__(self, folder: Path, timeout_s: float = 1800.0, poll_s: float = 0.2) -> None:
        self.folder = folder
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    def holder(self) -> dict[str, object]:
        """What the lock file says about its last holder (empty when unreadable)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def __enter__(self) -> "BuildLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self.holder()
                if not announced:
                    started = holder.get("started")
                    ago = f", started {time.time() - started:.0f} s ago" if isinstance(started, (int, float)) else ""
                    print(f"kiln: waiting for the native kernel build of pid {holder.get('pid', '?')}"
                          f"{ago} ({self.folder})…", file=sys.stderr, flush=True)
                    announced = True
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise KilnError(
                        f"kiln: gave up after {self.timeout_s:.0f} s waiting for the native kernel build of pid "
                        f"{holder.get('pid', '?')} on {holder.get('host', '?')} ({self.folder}). If that process "
                        "is stuck, stop it and start again, or set KILN_NO_NATIVE=1 to run on the plain-torch kernels."
                    )
                time.sleep(self.poll_s)
        self._fd = fd
        previous = self.holder()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode(), 0)
        self._break_stale_torch_lock(previous)
        return self

    def _break_stale_torch_lock(self, previous: dict[str, object]) -> None:
        torch_lock = self.folder / TORCH_LOCK_NAME
        if not torch_lock.exists():
            return
        pid = previous.get("pid")
        gone = f"pid {pid}, " if isinstance(pid, int) and not process_alive(pid) else ""
        print(f"kiln: warning: removed a stale build lock ({torch_lock}) left by a build that did not finish "
              f"({gone}its process is gone); building again", file=sys.stderr, flush=True)
        torch_lock.unlink(missing_ok=True)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
