"""Streamed pretraining data at scale: one part per rank and DataLoader worker, resume without replay.

The corpus files (JSONL, local or fsspec URLs) are cut into **shards** of about ``shard_mb`` MB: byte
ranges of the files (a line belongs to the shard it starts in, so every line is read exactly once;
compressed files are whole shards). The shards are dealt to ``world_size x workers`` **parts**, the
shards of a ``datasets.IterableDataset`` built with ``from_generator``: Accelerate
(``dispatch_batches=False``) gives rank ``r`` the parts ``[r*W, (r+1)*W)`` with
``IterableDataset.shard`` and ``datasets`` gives DataLoader worker ``w`` of that rank part ``r*W+w``,
so every consumer reads, tokenises and packs only its own bytes. ``W`` is the
``trainer.dataloader_num_workers`` the data is built for (``num_workers``; 0 counts as 1).

Each shard is made into rows on its own: documents (shuffled in a seeded buffer of ``shuffle_buffer``
documents when that is > 0), AC insertion + tokenisation, packing into ``block_size`` blocks
(the remainder of a shard is dropped unless ``keep_remainder``). So a shard's rows depend on the
shard only, and a part's stream is its shards in a fixed order (seeded, per pass, when shuffling).
With ``repeat: true`` a part starts another pass when it runs out, so no rank ever runs dry before
``max_steps`` (ranks whose data ended first would otherwise wait for the others at the next step).

**Resume.** After ``B`` batches per rank of ``batch_size`` rows, worker ``w`` of ``W`` has delivered
``ceil((B - w) / W)`` batches (the DataLoader takes batches from its workers in turn), a number of
rows of its own part. :func:`resume_stream` makes a dataset that skips them: whole shards whose row
count is in the **ledger** (one small JSON per finished shard under
``<cache_dir>/streams/<key>/``) are skipped without being read, and only the shard the position falls
in is re-made (at most ``shard_mb`` of text per worker). Worker ``j`` of the resumed run reads the
part of worker ``(j + B) % W``, so the batches come in exactly the uninterrupted run's order. This is
exact while no part has run out (``repeat: true`` parts never do) and with the same world size,
workers and batch size. The Trainer must then not skip batches itself (``ignore_data_skip=True``;
see :func:`resume_stream`). ``max_documents`` is split evenly over the parts (per pass); with it the
ledger is not used (a resume re-makes the skipped rows).

Reads are retried on transient errors with exponential backoff (:mod:`.retry`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..anchors import AnchorConfig
from .processing import TextProcessor, pack_documents, truncate_document
from .retry import RetryPolicy, is_compressed
from .sources import SkipLogger, iter_segment_documents
from .stats import DataStats

logger = logging.getLogger("anllm.data")

STREAM_ATTR = "_anllm_stream"  # the StreamSpec, kept on the returned dataset so resume_stream can rebuild it


@dataclass(frozen=True)
class StreamSpec:
    """Everything a DataLoader worker needs to make its rows (pickled to the workers)."""

    tokenizer: Any
    anchor: AnchorConfig | None
    block_size: int
    text_column: str = "text"
    packing: bool = True
    keep_remainder: bool = False
    splitter: str | None = None
    batch_size: int = 256  # documents per tokenizer call
    shuffle_buffer: int = 0  # documents; 0 = file order
    seed: int = 0
    repeat: bool = False
    max_documents: int | None = None  # per part and pass
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    world_size: int = 1
    workers: int = 1  # parts per rank = DataLoader workers per rank the stream is built for
    shards: tuple = ()  # the plan: per shard, its [url, start, end] segments
    ledger_dir: str | None = None
    skip_batches: int = 0  # resume: batches of skip_batch_size rows each rank already trained on
    skip_batch_size: int = 0

    @property
    def parts(self) -> int:
        return self.world_size * self.workers

    @property
    def num_shards(self) -> int:
        return len(self.shards)


# --- planning ------------------------------------------------------------------------------------


def plan_shards(files: Sequence[tuple[str, int | None]], num_shards: int) -> list[list[list[Any]]]:
    """Cut ``files`` (``(url, size)``) into about ``num_shards`` shards of equal bytes.

    A shard is a list of ``[url, start, end]`` segments (``end`` None = to the end of the file). The
    splittable files are laid end to end and cut at equal byte offsets, so a shard may span two files;
    compressed files and files of unknown size are one shard each. Empty pieces are dropped.
    """
    whole = [[[u, 0, None]] for u, s in files if s is None or is_compressed(u)]
    split = [(u, int(s)) for u, s in files if s is not None and not is_compressed(u)]
    total = sum(s for _, s in split)
    pieces = max(1, num_shards - len(whole)) if split else 0
    bounds = [round(k * total / pieces) for k in range(pieces + 1)] if pieces else []
    shards: list[list[list[Any]]] = []
    for k in range(pieces):
        lo, hi = bounds[k], bounds[k + 1]
        if hi <= lo:
            continue
        segs, offset = [], 0
        for url, size in split:
            a, b = max(lo, offset), min(hi, offset + size)
            if a < b:
                segs.append([url, a - offset, None if b == offset + size else b - offset])
            offset += size
        shards.append(segs)
    # keep the files' order: whole files where they were listed
    order = {u: i for i, (u, _) in enumerate(files)}
    out = shards + whole
    out.sort(key=lambda segs: (order[segs[0][0]], segs[0][1]))
    return out


def shard_count(total_bytes: int, shard_mb: float, parts: int) -> int:
    """A multiple of ``parts`` (every part gets as many shards) near ``total / shard_mb``."""
    target = max(1, math.ceil(total_bytes / max(1.0, shard_mb * 2**20)))
    return parts * max(1, math.ceil(target / parts))


def part_shards(spec: StreamSpec, part: int, pass_no: int) -> list[int]:
    """Shard indices of ``part`` in pass ``pass_no``, in reading order."""
    order = np.arange(spec.num_shards)
    if spec.shuffle_buffer > 0:
        order = np.random.default_rng([spec.seed, pass_no]).permutation(spec.num_shards)
    return [int(i) for i in order[part :: spec.parts]]


# --- rows of one shard ---------------------------------------------------------------------------


def _shuffled(docs: Iterable[str], buffer: int, rng: np.random.Generator) -> Iterator[str]:
    buf: list[str] = []
    for doc in docs:
        if len(buf) < buffer:
            buf.append(doc)
            continue
        j = int(rng.integers(len(buf)))
        yield buf[j]
        buf[j] = doc
    for j in rng.permutation(len(buf)):
        yield buf[int(j)]


def _tokenized(texts: Iterable[str], processor: TextProcessor, batch_size: int) -> Iterator[np.ndarray]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield from _encode(batch, processor)
            batch = []
    if batch:
        yield from _encode(batch, processor)


def _encode(batch: list[str], processor: TextProcessor) -> Iterator[np.ndarray]:
    for ids in processor({processor.text_column: batch})["input_ids"]:
        if len(ids):
            yield np.asarray(ids, dtype=np.int64)


def rows_from_texts(texts: Iterable[str], spec: StreamSpec, processor: TextProcessor | None = None) -> Iterator[dict]:
    """Training rows (``input_ids``/``labels``/``document_ids`` lists) of documents, as the cached path makes them."""
    processor = processor or TextProcessor(spec.tokenizer, spec.anchor, "text", spec.splitter)
    docs = _tokenized(texts, processor, spec.batch_size)
    if spec.packing:
        for block in pack_documents(docs, spec.block_size, spec.keep_remainder):
            yield {k: v.tolist() for k, v in block.items()}
    else:
        for ids in docs:
            yield truncate_document(ids.tolist(), spec.block_size)


def shard_rows(shard: list[list[Any]], index: int, pass_no: int, spec: StreamSpec, skip: SkipLogger,
               processor: TextProcessor, limit: list[int] | None = None) -> Iterator[dict]:
    """The rows of one shard. ``limit``: a one-item list of documents still allowed (max_documents)."""
    texts: Iterable[str] = (t for _, t in iter_segment_documents(shard, spec.text_column, skip, None, spec.policy))
    if limit is not None:
        texts = _limited(texts, limit)
    if spec.shuffle_buffer > 0:
        texts = _shuffled(texts, spec.shuffle_buffer, np.random.default_rng([spec.seed, pass_no, index, 1]))
    yield from rows_from_texts(texts, spec, processor)


def _limited(texts: Iterable[str], limit: list[int]) -> Iterator[str]:
    for text in texts:
        if limit[0] <= 0:
            return
        limit[0] -= 1
        yield text


# --- the ledger: rows per finished shard ----------------------------------------------------------


def _ledger_path(spec: StreamSpec, index: int, pass_no: int) -> Path | None:
    if spec.ledger_dir is None or spec.max_documents is not None:
        return None
    name = f"shard{index:06d}" + (f"-pass{pass_no}" if spec.shuffle_buffer > 0 else "") + ".json"
    return Path(spec.ledger_dir) / name


def ledger_rows(spec: StreamSpec, index: int, pass_no: int) -> int | None:
    path = _ledger_path(spec, index, pass_no)
    if path is None:
        return None
    try:
        return int(json.loads(path.read_text())["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


_ledger_warned = False


def _write_ledger(spec: StreamSpec, index: int, pass_no: int, rows: int) -> None:
    global _ledger_warned
    path = _ledger_path(spec, index, pass_no)
    if path is None or path.is_file():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps({"rows": rows}) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # the ledger only saves time on resume
        if not _ledger_warned:
            _ledger_warned = True
            logger.warning("Cannot write the stream ledger under %s (%s); a resume will re-make skipped shards.",
                           spec.ledger_dir, e)


# --- a part's stream -----------------------------------------------------------------------------


def _consumer() -> tuple[int, int, int]:
    """(rank, DataLoader worker id, number of workers) of the calling process."""
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    rank = int(os.environ.get("RANK", "0"))
    return rank, (info.id if info is not None else 0), (info.num_workers if info is not None else 1)


def batches_of_worker(batches: int, worker: int, workers: int) -> int:
    """Batches worker ``worker`` of ``workers`` delivered among the first ``batches`` (they take turns)."""
    return max(0, (batches - worker + workers - 1) // workers)


def part_rows(part: int, spec: StreamSpec, stats: DataStats | None = None) -> Iterator[dict]:
    """The rows of one part: its shards pass after pass (one pass unless ``repeat``), minus what resume skips."""
    rank, worker, workers = _consumer()
    if workers < spec.workers:
        raise ValueError(
            f"The streamed data was built for {spec.workers} DataLoader workers per rank but is read by {workers}; "
            f"use the same trainer.dataloader_num_workers as the data was built with (num_workers)."
        )
    # the rank and DataLoader worker this part was planned for; a resumed stream hands part
    # r*W + (j + B) % W to worker j, so the DataLoader's first batch is the one the run would have taken next
    own_rank, own_worker = divmod(part, spec.workers)
    shift = spec.skip_batches % spec.workers
    if spec.world_size > 1 and (own_rank, (own_worker - shift) % spec.workers) != (rank, worker):
        logger.warning("Stream part %d is read by rank %d worker %d, not the one it was planned for: the data is not "
                       "split per rank (Accelerate needs dispatch_batches=False); resume positions will be off.",
                       part, rank, worker)
    to_skip = spec.skip_batch_size * batches_of_worker(spec.skip_batches, own_worker, spec.workers)
    done = {"shards": 0, "rows": 0, "replayed": 0, "logged": not to_skip}

    def progressed(index: int) -> None:
        if not to_skip and not done["logged"]:
            done["logged"] = True
            logger.info("Resumed stream part %d (rank %d, worker %d): skipped %d shard(s) unread (%d rows, from the "
                        "ledger), re-made %d row(s) of shard %d.", part, rank, worker, done["shards"], done["rows"],
                        done["replayed"], index)

    skip = SkipLogger(stats if stats is not None else DataStats(kind="hub", streaming=True))
    processor = TextProcessor(spec.tokenizer, spec.anchor, "text", spec.splitter)
    pass_no = 0
    while True:
        limit = None if spec.max_documents is None else [spec.max_documents]
        rows_in_pass = 0
        for index in part_shards(spec, part, pass_no):
            if to_skip:
                known = ledger_rows(spec, index, pass_no)
                if known is not None and known <= to_skip:
                    to_skip -= known
                    done["shards"] += 1
                    done["rows"] += known
                    rows_in_pass += known
                    progressed(index)
                    continue
            n = 0
            for row in shard_rows(spec.shards[index], index, pass_no, spec, skip, processor, limit):
                n += 1
                if to_skip:
                    to_skip -= 1
                    done["replayed"] += 1
                    progressed(index)
                    continue
                yield row
            rows_in_pass += n
            if limit is None:
                _write_ledger(spec, index, pass_no, n)
            elif limit[0] <= 0:
                break
        pass_no += 1
        if not spec.repeat or rows_in_pass == 0:
            if to_skip:
                logger.warning("Stream part %d ended %d row(s) before its resume position.", part, to_skip)
            if spec.repeat and rows_in_pass == 0:
                logger.warning("Stream part %d has no rows; it does not repeat.", part)
            return


def _gen_parts(parts: list[int], spec: StreamSpec, stats: DataStats | None = None) -> Iterator[dict]:
    """``stats`` counts skipped records when iterated in this process (DataLoader workers count their own)."""
    for part in parts:
        yield from part_rows(part, spec, stats)


# --- building ------------------------------------------------------------------------------------


def stream_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def plan_stream(files: Sequence[tuple[str, int | None]], spec: StreamSpec, shard_mb: float) -> StreamSpec:
    """``spec`` with its shards: ``files`` (``(url, size)``) cut for ``spec.parts`` parts."""
    total = sum(s or 0 for _, s in files)
    shards = plan_shards(files, shard_count(total, shard_mb, spec.parts))
    if len(shards) < spec.parts:
        logger.warning("The stream has %d shard(s) for %d parts (%d ranks x %d workers): %d part(s) get no data. "
                       "Use more (or splittable, uncompressed) files.", len(shards), spec.parts, spec.world_size,
                       spec.workers, spec.parts - len(shards))
    return replace(spec, shards=tuple(shards))


def stream_dataset(spec: StreamSpec, stats: DataStats | None = None) -> Any:
    """The ``datasets.IterableDataset`` of a planned stream: one shard per part (see the module docstring)."""
    from datasets import IterableDataset

    shift = spec.skip_batches % spec.workers
    parts = [r * spec.workers + (j + shift) % spec.workers for r in range(spec.world_size) for j in range(spec.workers)]
    ds = IterableDataset.from_generator(_gen_parts, gen_kwargs={"parts": parts, "spec": spec, "stats": stats})
    setattr(ds, STREAM_ATTR, (spec, stats))
    return ds


def is_resumable(ds: Any) -> bool:
    return getattr(ds, STREAM_ATTR, None) is not None


def resume_stream(ds: Any, batches: int, batch_size: int) -> Any:
    """``ds`` continued after ``batches`` batches of ``batch_size`` rows per rank (see the module docstring).

    Datasets that are not anllm streams are returned unchanged (the Trainer's own batch skipping then
    applies; a cached, map-style dataset skips without reading anything).
    """
    plan = getattr(ds, STREAM_ATTR, None)
    if plan is None:
        return ds
    spec, stats = plan
    spec = replace(spec, skip_batches=int(batches), skip_batch_size=int(batch_size))
    logger.info("Streamed data resumes after %d batches of %d rows per rank (%d parts, %d shards).", batches,
                batch_size, spec.parts, spec.num_shards)
    return stream_dataset(spec, stats)
