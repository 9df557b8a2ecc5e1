"""Small shared helpers: an inter-process file lock that also works where ``flock`` does not."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

logger = logging.getLogger("anllm")

# flock fails with these where the filesystem has no (cluster-wide) flock: Lustre mounted without
# -o flock (ENOLCK / EOPNOTSUPP), some NFS and FUSE mounts (ENOLCK / ENOSYS / EINVAL).
NO_FLOCK_ERRNOS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})
LOCK_MODE_ENV = "ANLLM_LOCK"  # "file": always lock files (e.g. Lustre -o localflock, where flock is node-local)
STALE_ENV = "ANLLM_LOCK_STALE_S"
DEFAULT_STALE_S = 120.0

_warned_fallback: set[str] = set()


class FileLock:
    """Exclusive lock on ``path`` between processes, on one machine or on a shared filesystem.

    * ``flock`` where the filesystem supports it: the kernel releases it when the holder dies.
    * Otherwise (``flock`` raises ENOLCK/EOPNOTSUPP/..., or ``ANLLM_LOCK=file``) a lock file
      ``<path>.held`` created atomically with ``O_CREAT | O_EXCL``. It names its holder (pid, host,
      time); the holder refreshes its mtime every ``stale_after / 4`` seconds from a daemon thread, and
      a lock file not refreshed for ``stale_after`` seconds (or whose pid is gone, on this host) is
      taken over, so a killed job does not block the next one for long.

    ``acquire(blocking=False)`` returns False at once when a live process holds the lock (with lock
    files: when the holder refreshed it within ``stale_after``, watching for up to that long when the
    lock is recent and its holder unknown).
    """

    def __init__(self, path: str | Path, stale_after: float | None = None, poll: float = 0.2):
        self.path = Path(path)
        self.held_path = self.path.with_name(self.path.name + ".held")
        self.stale_after = float(stale_after if stale_after is not None else os.environ.get(STALE_ENV, DEFAULT_STALE_S))
        self.poll = poll
        self.mode: str | None = None  # "flock" | "file" once acquired
        self._fh = None
        self._token: str | None = None
        self._stop: threading.Event | None = None

    # -- public ------------------------------------------------------------------------------
    def acquire(self, blocking: bool = True, timeout: float | None = None, purpose: str = "") -> bool:
        """Take the lock; False when ``blocking=False`` (or ``timeout`` passed) and someone else holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        if os.environ.get(LOCK_MODE_ENV, "").lower() != "file":
            got = self._acquire_flock(blocking, deadline, purpose)
            if got is not None:
                return got
        return self._acquire_file(blocking, deadline, purpose)

    def release(self) -> None:
        if self.mode == "flock" and self._fh is not None:
            try:
                fcntl.flock(self._fh, fcntl.LOCK_UN)
            finally:
                self._fh.close()
                self._fh = None
        elif self.mode == "file":
            if self._stop is not None:
                self._stop.set()
                self._stop = None
            try:
                if self.held_path.read_text() == self._token:  # never remove a lock someone took over
                    self.held_path.unlink()
            except OSError:
                pass
            self._token = None
        self.mode = None

    def holder(self) -> str:
        """Who holds (or last held) the lock, as written in the lock file."""
        for p in (self.held_path, self.path):
            try:
                text = p.read_text().strip()
            except OSError:
                continue
            if text:
                return text.split(" [", 1)[0]
        return "another process"

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- flock -------------------------------------------------------------------------------
    def _acquire_flock(self, blocking: bool, deadline: float | None, purpose: str) -> bool | None:
        """True/False, or None when this filesystem has no flock (then lock files are used)."""
        fh = open(self.path, "a+")
        waited = False
        try:
            while True:
                try:
                    wait_here = blocking and deadline is None
                    fcntl.flock(fh, fcntl.LOCK_EX if wait_here and waited else fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not blocking or (deadline is not None and time.monotonic() >= deadline):
                        fh.close()
                        return False
                    if not waited:
                        waited = True
                        _log_wait(self, purpose)
                    if deadline is not None:
                        time.sleep(self.poll)
        except OSError as e:
            fh.close()
            if e.errno in NO_FLOCK_ERRNOS:
                key = str(self.path.parent)
                if key not in _warned_fallback:
                    _warned_fallback.add(key)
                    logger.info("flock is not available on %s (%s); using lock files there instead.", key,
                                os.strerror(e.errno or 0))
                return None
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(_identity() + "\n")
        fh.flush()
        self._fh, self.mode = fh, "flock"
        return True

    # -- lock files --------------------------------------------------------------------------
    def _acquire_file(self, blocking: bool, deadline: float | None, purpose: str) -> bool:
        waited = False
        watch_until = None  # non-blocking: how long to watch a recent lock of unknown liveness
        seen_mtime = None
        delay = self.poll
        while True:
            if self._try_create():
                return True
            state = self._inspect()
            if state is None:  # vanished between our attempts: try again at once
                continue
            mtime, text, dead = state
            age = time.time() - mtime
            if dead or age > self.stale_after:
                self._break(text, age, dead)
                continue
            if not blocking:
                if seen_mtime is None:
                    seen_mtime = mtime
                    watch_until = time.monotonic() + self.stale_after - age + self.poll
                elif mtime != seen_mtime:  # refreshed: its holder is alive
                    return False
                if time.monotonic() >= watch_until:
                    return False
            elif deadline is not None and time.monotonic() >= deadline:
                return False
            if not waited:
                waited = True
                _log_wait(self, purpose)
            time.sleep(delay)
            delay = min(delay * 1.5, 5.0, max(self.poll, self.stale_after / 8))

    def _try_create(self) -> bool:
        token = f"{_identity()} [{uuid.uuid4().hex}]"
        try:
            fd = os.open(self.held_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, token.encode())
        finally:
            os.close(fd)
        self._token, self.mode = token, "file"
        self._stop = threading.Event()
        threading.Thread(target=_heartbeat, args=(self.held_path, token, self._stop, self.stale_after / 4),
                         daemon=True, name=f"lock-heartbeat:{self.held_path.name}").start()
        return True

    def _inspect(self) -> tuple[float, str, bool] | None:
        """(mtime, content, holder known dead) of the lock file; None when it is gone."""
        try:
            mtime = self.held_path.stat().st_mtime
            text = self.held_path.read_text()
        except FileNotFoundError:
            return None
        return mtime, text, _holder_dead(text)

    def _break(self, text: str, age: float, dead: bool) -> None:
        """Remove a stale lock file, unless someone replaced it meanwhile (then put theirs back)."""
        aside = self.held_path.with_name(f"{self.held_path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.held_path, aside)
        except FileNotFoundError:
            return
        try:
            moved = aside.read_text()
        except OSError:
            moved = text
        if moved != text:  # a fresh lock was created after we looked: restore it (fails if yet another exists)
            try:
                os.link(aside, self.held_path)
            except OSError:
                pass
        else:
            logger.warning("Took over the lock %s from %s (%s).", self.held_path, text.split(" [", 1)[0] or "?",
                           "that process is gone" if dead else f"not refreshed for {age:.0f} s")
        aside.unlink(missing_ok=True)


def _identity() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}"


def _holder_dead(text: str) -> bool:
    """True when the lock names a process on this host that no longer exists."""
    parts = text.split()
    if len(parts) < 4 or parts[0] != "pid" or parts[2] != "on" or parts[3] != socket.gethostname():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _heartbeat(path: Path, token: str, stop: threading.Event, every: float) -> None:
    while not stop.wait(max(every, 0.05)):
        try:
            if path.read_text() != token:
                return  # taken over (we were presumed dead): stop touching someone else's lock
            os.utime(path)
        except OSError:
            return


def _log_wait(lock: FileLock, purpose: str) -> None:
    logger.info("Waiting for %s to release %s%s.", lock.holder(), lock.path.name, f" ({purpose})" if purpose else "")


@contextlib.contextmanager
def file_lock(path: Path, purpose: str = "") -> Iterator[FileLock]:
    """Serialise builders of one cached artefact (others wait instead of rebuilding; see :class:`FileLock`)."""
    lock = FileLock(path)
    lock.acquire(purpose=purpose)
    try:
        yield lock
    finally:
        lock.release()
