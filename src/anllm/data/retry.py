"""Reading data files that may fail for a moment: retries with exponential backoff, resuming at the byte.

A multi-day run that streams its corpus over HTTP must not die of one dropped connection or one 503.
:func:`iter_lines` reads a file (local path or fsspec URL: ``hf://``, ``https://``, ...) or a byte
range of it line by line; when a read fails with a transient error (:func:`is_transient`: connection
errors, timeouts, HTTP 408/425/429/5xx, EIO/ESTALE) it waits (``backoff_s`` doubling up to
``max_backoff_s``, with jitter), logs the retry, reopens the file and continues at the byte where it
stopped (compressed files: re-reads and skips the lines already read). ``attempts`` consecutive
failures without progress raise the last error; any progress resets the count. A missing file, a
denied permission or an HTTP 404 are not transient and raise at once.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

logger = logging.getLogger("anllm.data")

T = TypeVar("T")

COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4", ".zip")
_TRANSIENT_STATUS = {408, 425, 429}
_TRANSIENT_ERRNO = {errno.EIO, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT,
                    errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESTALE, errno.EAGAIN}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries per failure streak; waits ``backoff_s * 2**k`` (capped at ``max_backoff_s``)."""

    attempts: int = 10
    backoff_s: float = 2.0
    max_backoff_s: float = 120.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "RetryPolicy":
        """From ``data.retry`` (``{attempts, backoff_s, max_backoff_s}``; missing keys keep the defaults)."""
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - {"attempts", "backoff_s", "max_backoff_s"})
        if unknown:
            raise ValueError(f"data.retry has unknown keys {unknown}; known: attempts, backoff_s, max_backoff_s.")
        policy = cls(**{k: type(getattr(cls, k))(v) for k, v in cfg.items()})
        if policy.attempts < 1 or policy.backoff_s < 0 or policy.max_backoff_s < 0:
            raise ValueError(f"data.retry needs attempts >= 1 and non-negative waits, got {policy}.")
        return policy

    def delay(self, failure: int) -> float:
        """Seconds to wait before retry number ``failure`` (1-based), with +-25% jitter."""
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (failure - 1))
        return base * random.uniform(0.75, 1.25)


def _status(exc: BaseException) -> int | None:
    for attr in ("status", "status_code"):  # not "code": aiohttp's payload errors carry a parser code 400
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None) if response is not None else None
    return value if isinstance(value, int) else None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 8:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def is_transient(exc: BaseException) -> bool:
    """Whether reading again later may succeed (see the module docstring)."""
    for e in _chain(exc):
        status = _status(e)
        if status is not None:  # an HTTP answer decides (fsspec turns a 503 into FileNotFoundError "from" it)
            return status in _TRANSIENT_STATUS or status >= 500
    if isinstance(exc, _PERMANENT):
        return False
    for e in _chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        name = type(e).__name__
        module = type(e).__module__ or ""
        if module.startswith(("aiohttp", "httpx", "requests", "urllib3", "http.client", "fsspec", "huggingface_hub")) and (
            name.endswith(("ConnectionError", "Timeout", "TimeoutError", "PayloadError", "ProtocolError",
                           "ServerDisconnectedError", "ChunkedEncodingError", "IncompleteRead", "ReadError",
                           "RemoteProtocolError", "ClientOSError", "TransportError", "NetworkError"))
        ):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return True
    return False


def call_with_retry(fn: Callable[[], T], what: str, policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried on transient errors (listing files, asking for a size, ...)."""
    failures = 0
    while True:
        try:
            return fn()
        except Exception as e:  # classified below
            failures += 1
            if not is_transient(e) or failures >= policy.attempts:
                raise
            wait = policy.delay(failures)
            logger.warning("%s failed (%s: %s); retry %d/%d in %.1f s.", what, type(e).__name__, e, failures,
                           policy.attempts - 1, wait)
            sleep(wait)


def is_remote(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def is_compressed(path: str | Path) -> bool:
    return str(path).lower().endswith(COMPRESSED)


def _open(path: str | Path) -> Any:
    if isinstance(path, str) and "://" in path:
        import fsspec

        return fsspec.open(path, "rb", compression="infer").open()
    return open(path, "rb")


def iter_lines(
    path: str | Path, start: int = 0, end: int | None = None, policy: RetryPolicy | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[int, int | None, bytes]]:
    """``(byte offset, line number or None, raw line)`` of the lines that *start* in ``[start, end)``.

    A line that starts before ``end`` is read to its end even past ``end``; when ``start > 0`` the
    partial line at ``start`` belongs to the previous range. Together, consecutive ranges cover
    every line exactly once. Line numbers are known (1-based) only when reading from byte 0.
    Compressed files are read whole (``start``/``end`` must be 0/None).
    """
    policy = policy or RetryPolicy()
    compressed = is_compressed(path)
    if compressed and (start or end is not None):
        raise ValueError(f"{path} is compressed and cannot be read from byte {start}; read it whole.")
    pos = start  # offset of the next line to yield (uncompressed bytes)
    lineno: int | None = 1 if start == 0 else None
    failures = 0
    first = True  # the partial line before `start` still has to be skipped
    while True:
        fh = None
        try:
            fh = _open(path)
            if compressed:
                for _ in range(pos):  # pos counts lines here: skip those already yielded
                    fh.readline()
            elif first and start > 0:
                fh.seek(start - 1)
                pos = start - 1 + len(fh.readline())  # the rest of the line that contains byte start-1
            elif pos:
                fh.seek(pos)
            first = False
            for raw in fh:
                if not compressed and end is not None and pos >= end:
                    return
                offset = pos
                pos += 1 if compressed else len(raw)
                failures = 0  # progress: a new failure streak starts from scratch
                yield offset, lineno, raw
                if lineno is not None:
                    lineno += 1
            return
        except Exception as e:  # classified below
            failures += 1
            if not is_transient(e) or failures >= policy.attempts:
                if failures > 1:
                    logger.error("Giving up on %s after %d failed reads: %s", path, failures, e)
                raise
            wait = policy.delay(failures)
            logger.warning("Reading %s failed at %s %d (%s: %s); retry %d/%d in %.1f s.", path,
                           "line" if compressed else "byte", pos, type(e).__name__, e, failures,
                           policy.attempts - 1, wait)
            sleep(wait)
        finally:
            if fh is not None:
                try:
                    fh.close()
                except Exception:  # noqa: BLE001, S110 - a broken connection may fail to close too
                    pass
