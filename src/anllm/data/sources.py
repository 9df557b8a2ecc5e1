"""Where documents come from: local JSONL files, SFT files, and the checks that make bad input loud.

Readers are generators of plain strings/dicts so they can feed ``datasets.Dataset.from_generator``
(which writes Arrow to disk as it goes) without holding a corpus in memory. Bad records are skipped
and counted in :class:`~anllm.data.stats.DataStats`; a source with no valid record at all is an
error, because training on nothing is never what was meant.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from .retry import RetryPolicy, call_with_retry, iter_lines
from .stats import DataStats

logger = logging.getLogger("anllm.data")

MAX_WARNINGS = 10  # per build; the rest are counted silently


def default_base_dir() -> Path:
    """Hydra's original working directory when running under Hydra, else the current one."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd

        if HydraConfig.initialized():
            return Path(get_original_cwd())
    except ImportError:  # pragma: no cover
        pass
    return Path.cwd()


def resolve_paths(patterns: str | Sequence[str], base_dir: str | Path | None = None) -> list[Path]:
    """Expand files and globs; relative ones are taken from ``base_dir`` (default: the current dir).

    Under Hydra the current directory may be the run's output dir, so callers pass the original
    working directory as ``base_dir``.
    """
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    if not patterns:
        raise ValueError("The data config lists no paths: set data.paths to a list of files or globs.")
    base = Path(base_dir).expanduser() if base_dir is not None else Path.cwd()
    out: list[Path] = []
    for pattern in patterns:
        p = Path(str(pattern)).expanduser()
        full = p if p.is_absolute() else base / p
        if glob.has_magic(str(full)):
            matches = sorted(Path(m) for m in glob.glob(str(full), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise FileNotFoundError(f"No file matches the data pattern {str(pattern)!r} (looked for {full}).")
            out.extend(matches)
        elif full.is_dir():
            raise IsADirectoryError(f"Data path {str(pattern)!r} is a directory ({full}); use a glob such as {p}/*.jsonl.")
        elif not full.is_file():
            raise FileNotFoundError(f"Data file {str(pattern)!r} does not exist (looked for {full}).")
        else:
            out.append(full)
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def resolve_remote(patterns: str | Sequence[str], repo: str | None = None, policy: RetryPolicy | None = None) -> list[str]:
    """Expand remote file globs to URLs. Entries with ``://`` are used as they are; others are paths
    inside the Hugging Face dataset ``repo`` (``hf://datasets/<repo>/<pattern>``). Listing is retried
    on transient errors."""
    import fsspec

    policy = policy or RetryPolicy()
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        if "://" not in pattern:
            if not repo:
                raise ValueError(f"data_files entry {pattern!r} is not a URL; set data.name to the hub dataset it is in.")
            pattern = f"hf://datasets/{repo}/{pattern.lstrip('/')}"
        files = call_with_retry(lambda p=pattern: fsspec.open_files(p, "rb"), f"Listing {pattern}", policy)
        if not files:
            raise FileNotFoundError(f"No file matches the data pattern {pattern!r}.")
        protocol = pattern.split("://", 1)[0]
        urls.extend(f"{protocol}://{f.path}" if "://" not in f.path else f.path for f in files)
    return urls


def remote_size(url: str, policy: RetryPolicy | None = None) -> int | None:
    """Size in bytes of a local path or fsspec URL (None when the server does not say)."""
    if "://" not in url:
        return Path(url).stat().st_size
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    size = call_with_retry(lambda: fs.size(path), f"Asking the size of {url}", policy or RetryPolicy())
    return int(size) if size is not None else None


class SkipLogger:
    """Counts skipped records in ``stats`` and warns about the first few with file:line."""

    def __init__(self, stats: DataStats):
        self.stats = stats
        self.warned = 0

    def __call__(self, reason: str, where: str, detail: str = "") -> None:
        """``reason`` is the counted category; ``detail`` only goes into the message."""
        full = f"{reason} ({detail})" if detail else reason
        self.stats.skip(reason, where if not detail else f"{where} ({detail})")
        if self.warned < MAX_WARNINGS:
            self.warned += 1
            logger.warning("Skipping %s: %s", where, full)
            if self.warned == MAX_WARNINGS:
                logger.warning("Further skipped records are only counted (see DataStats.skipped).")


def iter_jsonl_records(
    path: Path | str, skip: SkipLogger, start: int = 0, end: int | None = None, policy: RetryPolicy | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, object)`` for every line that parses as a JSON object; blank lines are ignored.

    ``path`` is a local path or an fsspec URL (``hf://datasets/...``, ``https://...``; ``.gz`` etc.
    decompressed). Lines are read as bytes and decoded one by one, so a broken UTF-8 sequence costs
    one line, not the rest of the file. ``start``/``end`` restrict the read to the lines that start
    in that byte range (a shard of the file); transient read errors are retried (:mod:`.retry`).
    ``where`` is ``file:line`` (``file@byte`` for a range that does not start at byte 0).
    """
    for offset, lineno, raw in iter_lines(path, start, end, policy):
        where = f"{path}:{lineno}" if lineno is not None else f"{path}@{offset}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            skip("invalid UTF-8", where, e.reason)
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            skip("malformed JSON", where, e.msg)
            continue
        if not isinstance(obj, dict):
            skip("not a JSON object", where, type(obj).__name__)
            continue
        yield where, obj


def iter_jsonl_texts(
    paths: Sequence[Path | str], text_column: str, skip: SkipLogger, max_documents: int | None = None,
    policy: RetryPolicy | None = None,
) -> Iterator[str]:
    """Texts of ``text_column`` across files (local or URLs), skipping (and counting) bad or empty records.

    The first valid record of each file must have the column: if it does not, the config names the
    wrong column and a ValueError lists the columns that exist.
    """
    for _, text in iter_jsonl_documents(paths, text_column, skip, max_documents, policy):
        yield text


def iter_jsonl_documents(
    paths: Sequence[Path | str], text_column: str, skip: SkipLogger, max_documents: int | None = None,
    policy: RetryPolicy | None = None,
) -> Iterator[tuple[str, str]]:
    """``(file:line, text)`` of every usable record (see :func:`iter_jsonl_texts`)."""
    segments = [(p, 0, None) for p in paths]
    yield from iter_segment_documents(segments, text_column, skip, max_documents, policy)


def iter_segment_documents(
    segments: Sequence[Sequence[Any]], text_column: str, skip: SkipLogger, max_documents: int | None = None,
    policy: RetryPolicy | None = None,
) -> Iterator[tuple[str, str]]:
    """``(where, text)`` of every usable record in ``(path, start, end)`` byte ranges, in order.

    The column check of :func:`iter_jsonl_texts` applies to ranges that start a file (byte 0).
    """
    n = 0
    for path, start, end in segments:
        checked = bool(start)
        for where, obj in iter_jsonl_records(path, skip, int(start or 0), None if end is None else int(end), policy):
            if text_column not in obj:
                if not checked:
                    raise ValueError(
                        f"{where}: no column {text_column!r}; the records have columns {sorted(obj)}. "
                        f"Set data.text_column to one of them."
                    )
                skip("no text field", where, text_column)
                continue
            checked = True
            text = obj[text_column]
            if not isinstance(text, str):
                skip("text is not a string", where, type(text).__name__)
                continue
            if not text.strip():
                skip("empty document", where)
                continue
            yield where, text
            n += 1
            if max_documents is not None and n >= max_documents:
                return


# --- SFT sources -------------------------------------------------------------------------------


def iter_alpaca(path: Path, skip: SkipLogger) -> Iterator[dict[str, str]]:
    """Alpaca records ``{instruction, input, output}`` from a JSON array (``input`` may be missing)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); Alpaca data is one JSON array of objects.") from e
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; Alpaca data is a JSON array of objects.")
    for i, rec in enumerate(data):
        where = f"{path}[{i}]"
        if not isinstance(rec, dict):
            skip("not a JSON object", where, type(rec).__name__)
            continue
        fields_ = {k: rec.get(k, "" if k == "input" else None) for k in ("instruction", "input", "output")}
        bad = [k for k, v in fields_.items() if not isinstance(v, str)]
        if bad:
            skip("missing or non-string field", where, ", ".join(bad))
            continue
        if not fields_["instruction"].strip() or not fields_["output"].strip():
            skip("empty instruction or output", where)
            continue
        yield fields_  # type: ignore[misc]


TRANSLATION_INSTRUCTION = "Translate the following sentences from German to English."


def iter_parallel(
    path: Path, skip: SkipLogger, src: str = "de", tgt: str = "en", instruction: str = TRANSLATION_INSTRUCTION
) -> Iterator[dict[str, str]]:
    """Translation pairs from JSONL ``{"de": ..., "en": ...}`` as Alpaca records."""
    checked = False
    for where, obj in iter_jsonl_records(path, skip):
        if not checked and (src not in obj or tgt not in obj):
            raise ValueError(f"{where}: parallel data needs fields {src!r} and {tgt!r}; found {sorted(obj)}.")
        checked = True
        s, t = obj.get(src), obj.get(tgt)
        if not isinstance(s, str) or not isinstance(t, str) or not s.strip() or not t.strip():
            skip("empty or non-string source/target", where)
            continue
        yield {"instruction": instruction, "input": s, "output": t}
