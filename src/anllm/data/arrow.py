"""Arrow I/O of the dataset builds: datasets from generators, packed blocks written straight to an
Arrow file, and counts read back column-wise (no per-row Python objects on the large paths)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..anchors import AnchorConfig
from .processing import pack_documents
from .stats import DataStats


def from_generator(gen: Callable[..., Iterator[dict]], features: Any, work: Path, num_proc: int | None = None,
                   **kwargs: Any) -> Any:
    """Arrow dataset (in ``work``) from a generator; None when it yields nothing.

    With ``num_proc`` the list-valued ``kwargs`` are split into contiguous runs, one per process, and
    the rows keep their order.
    """
    from datasets import Dataset

    counter = [0]

    def counted(**kw: Any) -> Iterator[dict]:
        for row in gen(**kw):
            counter[0] += 1
            yield row

    from datasets.exceptions import DatasetGenerationError

    try:
        return Dataset.from_generator(counted, features=features, cache_dir=str(work / "hf"), gen_kwargs=kwargs,
                                      num_proc=num_proc)
    except DatasetGenerationError as e:
        if isinstance(e.__cause__, (ValueError, OSError)):  # our own clear message, raised by a reader
            raise e.__cause__ from None
        raise
    except ValueError:
        if counter[0] == 0:  # datasets refuses empty generators; callers explain why it was empty
            return None
        raise


def gen_rows(make: Callable[[], Iterator[dict]]) -> Iterator[dict]:
    """A module-level generator (``datasets`` pickles it) over the rows ``make()`` yields."""
    yield from make()


def map_kwargs(num_proc: int, cfg: dict, desc: str) -> dict[str, Any]:
    """``datasets.map`` arguments of a build step: batched by ``data.batch_size``, over ``num_proc`` processes."""
    return {"batched": True, "batch_size": int(cfg.get("batch_size", 256)),
            "num_proc": num_proc if num_proc > 1 else None, "desc": desc}


def iter_token_arrays(tokenized: Any, column: str = "input_ids") -> Iterator[np.ndarray]:
    """Every row's ids as a numpy array, read batch-wise from Arrow without Python lists."""
    import pyarrow.compute as pc

    for table in tokenized.with_format("arrow").iter(batch_size=4096):
        col = table.column(column).combine_chunks()
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        lens = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        yield from np.split(flat, np.cumsum(lens)[:-1])


def write_packed(tokenized: Any, block_size: int, keep_remainder: bool, path: Path, rows_per_batch: int = 256) -> Any:
    """Pack and write blocks straight to an Arrow file (no per-row Python encoding); None if no block."""
    import pyarrow as pa
    from datasets import Dataset

    names = ("input_ids", "labels", "document_ids")
    schema = pa.schema([(n, pa.list_(pa.int32())) for n in names])
    pending: list[dict[str, np.ndarray]] = []
    n_rows = 0

    def batch() -> pa.RecordBatch:
        offsets = pa.array(np.concatenate([[0], np.cumsum([len(b["input_ids"]) for b in pending])]), pa.int32())
        cols = [pa.ListArray.from_arrays(offsets, pa.array(np.concatenate([b[n] for b in pending]).astype(np.int32)))
                for n in names]
        return pa.RecordBatch.from_arrays(cols, schema=schema)

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for block in pack_documents(iter_token_arrays(tokenized), block_size, keep_remainder):
            pending.append(block)
            if len(pending) == rows_per_batch:
                writer.write_batch(batch())
                n_rows += len(pending)
                pending = []
        if pending:
            writer.write_batch(batch())
            n_rows += len(pending)
    return Dataset.from_file(str(path)) if n_rows else None


def count_tokenized(tokenized: Any, stats: DataStats, anchor: AnchorConfig | None) -> np.ndarray:
    """Fill documents/tokens/anchors/sentences; empty documents are counted as skipped."""
    import pyarrow.compute as pc

    lengths, sentences = [], 0
    for table in tokenized.with_format("arrow").iter(batch_size=65536):
        lens = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False)
        lengths.append(lens)
        stats.anchors += int(pc.sum(table.column("n_anchors")).as_py() or 0)
        sentences += int(pc.sum(pc.max_element_wise(table.column("n_sentences"), 0)).as_py() or 0)
    lens = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    empty = int((lens == 0).sum())
    for _ in range(empty):
        stats.skip("empty document (nothing left to tokenise)")
    stats.documents = int((lens > 0).sum())
    stats.tokens = int(lens.sum())
    stats.sentences = sentences if anchor is not None and anchor.mode == "ac" else None
    if stats.documents == 0:
        raise ValueError(f"No document produced any token ({stats.num_skipped} skipped: {stats.skipped}).")
    return lens


def count_rows(ds: Any, stats: DataStats) -> None:
    """Fill rows/row_tokens/loss_tokens from the finished rows."""
    import pyarrow.compute as pc

    stats.rows = len(ds)
    for table in ds.with_format("arrow").iter(batch_size=4096):
        stats.row_tokens += int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
        labels = pc.list_flatten(table.column("labels"))
        stats.loss_tokens += int(pc.sum(pc.not_equal(labels, -100)).as_py() or 0)
