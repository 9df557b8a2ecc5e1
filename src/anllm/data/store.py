"""The dataset store: processed datasets on disk, keyed by everything that determines their content.

(Not the KV cache of generation, :mod:`anllm.cache`.)

The key hashes the data config, the identity of the input files (path, size, mtime), the tokenizer
(name, size, special ids and its full serialised model), the anchor config, the block size and the
declared format of the rows (:data:`ROW_FORMAT`: moving code around keeps caches, a change to the rows
does not - a golden test of the rows enforces the bump). Entries are written to a private
temporary directory and renamed into place, so an interrupted or concurrent build never leaves a
half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..utils import file_lock
from .stats import DataStats

if TYPE_CHECKING:
    from ..anchors import AnchorConfig

logger = logging.getLogger("anllm.data")

_DONE = "stats.json"  # written last inside the entry; its presence marks a complete entry
# The format of the rows the builds write. Bump it (1 -> 2) with any change to what a build writes - ids,
# labels, document ids, counts - so caches of the old rows are not reused: the golden digests in
# tests/data/row_format.json fail `test_rows_match_the_declared_row_format` until you do. (Until
# 2026-12-05 the key held a hash of the row-making source instead: every move of code rebuilt every cache.)
ROW_FORMAT = 1


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What makes two tokenizers produce the same ids."""
    ident: dict[str, Any] = {
        "name": getattr(tokenizer, "name_or_path", ""),
        "class": type(tokenizer).__name__,
        "len": len(tokenizer),
        "bos": getattr(tokenizer, "bos_token_id", None),
        "eos": getattr(tokenizer, "eos_token_id", None),
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ident["backend"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        ident["vocab"] = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()
    return ident


def file_identity(paths: list[Path]) -> list[list[Any]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def anchor_identity(anchor: AnchorConfig | None) -> dict[str, Any]:
    """The anchor settings that change the rows (attention-only options such as sinks reuse the entry)."""
    return {k: v for k, v in (anchor.to_dict() if anchor else {}).items()
            if k in ("mode", "anchor_token", "anchor_token_ids", "ac_after_last", "ac_join")}


def cache_key(parts: Mapping[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def check_space(cache_dir: Path, files: list[Path]) -> None:
    """Warn when the cache is about to fill a home directory or a disk (it needs 2-3x the input's size)."""
    size = sum(p.stat().st_size for p in files)
    if size < 2**30:
        return
    need = 3 * size
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache_dir).free
    except OSError:
        return
    home = Path.home().resolve()
    if home in cache_dir.resolve().parents:
        logger.warning("The dataset cache %s is under $HOME and this build needs about %.1f GB (2-3x the %.1f GB of "
                       "input). Put it on scratch: export ANLLM_CACHE=/scratch/$USER/anllm (or cache_dir=...).",
                       cache_dir, need / 2**30, size / 2**30)
    if free < need:
        logger.warning("The dataset cache %s has %.1f GB free; this build needs about %.1f GB.", cache_dir,
                       free / 2**30, need / 2**30)


def load_entry(entry: Path) -> tuple[Any, DataStats] | None:
    """The cached (dataset, stats) when the entry is complete, else None."""
    if not (entry / _DONE).is_file():
        return None
    from datasets import load_from_disk

    stats = DataStats.load(entry / _DONE)
    stats.from_cache = True
    stats.cache_path = str(entry)
    return load_from_disk(str(entry / "dataset")), stats


def build_entry(
    entry: Path, key_parts: Mapping[str, Any], build: Callable[[Path], tuple[Any, DataStats]]
) -> tuple[Any, DataStats]:
    """Run ``build(work_dir)`` (which returns an in-work-dir dataset) and publish it atomically at ``entry``.

    ``work_dir`` holds intermediate Arrow files and is removed afterwards. A lock (``flock``, or a lock
    file where the filesystem has no flock: :class:`anllm.utils.FileLock`) makes other processes, on
    this node or others sharing the filesystem, wait and then load the entry. The entry is built in a
    temporary directory and renamed into place, so a reader never sees a half-built one; if another
    process published it first anyway (a lock taken over from a presumed-dead holder), its copy is
    used and ours is discarded.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(entry.parent / f".{entry.name}.lock", purpose=f"building the dataset cache {entry.name}"):
        done = load_entry(entry)  # another process (e.g. a DDP rank) built it while we waited
        if done is not None:
            return done
        return _build_and_publish(entry, key_parts, build)


def _build_and_publish(
    entry: Path, key_parts: Mapping[str, Any], build: Callable[[Path], tuple[Any, DataStats]]
) -> tuple[Any, DataStats]:
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work = entry.parent / f".work-{entry.name}-{token}"
    tmp = entry.parent / f".tmp-{entry.name}-{token}"
    try:
        work.mkdir()
        ds, stats = build(work)
        tmp.mkdir()
        ds.save_to_disk(str(tmp / "dataset"))
        (tmp / "key.json").write_text(json.dumps(key_parts, indent=2, sort_keys=True, default=str) + "\n")
        stats.cache_path = str(entry)
        stats.save(tmp / _DONE)
        try:
            os.replace(tmp, entry)
        except OSError:
            if load_entry(entry) is None:  # not a concurrent winner: a stale, incomplete entry
                shutil.rmtree(entry, ignore_errors=True)
                os.replace(tmp, entry)
            else:
                logger.info("Another process built %s first; using its copy.", entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    loaded = load_entry(entry)
    if loaded is None:
        raise RuntimeError(f"The dataset cache entry {entry} vanished right after it was written.")
    stats.from_cache = False  # this call built it (the dataset is the memory-mapped published copy)
    return loaded[0], stats
