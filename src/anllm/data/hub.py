"""Streamed data (kind ``hub``): rows made on the fly from a hub dataset or remote JSONL files, nothing cached.

JSONL files (``data_files``) go through :mod:`anllm.data.stream` (one part per rank and DataLoader
worker, resumable, retried); any other script-free hub dataset through ``datasets``' own streaming,
processed by :func:`process_stream` with the same AC insertion, tokenisation and packing as the cache.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator

from ..anchors import AnchorConfig
from . import store
from .processing import TextProcessor, check_anchor_tokenizer
from .sources import resolve_remote
from .stats import DataStats

logger = logging.getLogger("anllm.data")


def build_hub(cfg: dict, tokenizer: Any, anchor: AnchorConfig | None, block_size: int, seed: int,
              cache_dir: str | Path, world_size: int, num_workers: int) -> tuple[Any, DataStats]:
    """Stream from the hub: JSONL files split into per-rank/per-worker parts (``data_files``), or any hub dataset."""
    from datasets import load_dataset

    stats = DataStats(kind="hub", mode=anchor.mode if anchor else "none", block_size=block_size, streaming=True)
    text_column = cfg.get("text_column", "text")
    if not cfg.get("streaming", True):
        raise ValueError("data.kind=hub streams (streaming: true); for local copies use kind=jsonl.")
    buffer = int(cfg.get("shuffle_buffer", 10_000))
    if cfg.get("data_files"):
        # Our own JSONL reader: text only (files whose other fields differ in schema, like
        # RedPajama's "meta", cannot break it), bad lines skipped and counted like kind=jsonl.
        from . import stream as stream_mod
        from .retry import RetryPolicy
        from .sources import remote_size

        policy = RetryPolicy.from_config(cfg.get("retry"))
        urls = resolve_remote(cfg["data_files"], cfg.get("name"), policy)
        files = [(u, remote_size(u, policy)) for u in urls]
        workers = max(1, int(num_workers or 0))
        parts = world_size * workers
        max_docs = cfg.get("max_documents")
        spec = stream_mod.StreamSpec(
            tokenizer=tokenizer, anchor=anchor, block_size=block_size, text_column=text_column,
            packing=bool(cfg.get("packing", True)), keep_remainder=bool(cfg.get("keep_remainder", False)),
            splitter=cfg.get("splitter"), batch_size=int(cfg.get("batch_size", 256)), shuffle_buffer=max(0, buffer),
            seed=int(seed), repeat=bool(cfg.get("repeat", False)),
            max_documents=None if max_docs is None else -(-int(max_docs) // parts),
            policy=policy, world_size=world_size, workers=workers,
        )
        spec = stream_mod.plan_stream(files, spec, float(cfg.get("shard_mb", 32)))
        key = stream_mod.stream_key({
            "shards": spec.shards, "sizes": files, "tokenizer": store.tokenizer_identity(tokenizer),
            "anchor": store.anchor_identity(anchor), "block_size": block_size, "row_format": store.ROW_FORMAT,
            "rows": {k: cfg.get(k) for k in ("text_column", "packing", "keep_remainder", "splitter", "shuffle_buffer")},
            "seed": seed if buffer > 0 else None,
        })
        ledger = Path(cache_dir).expanduser() / "streams" / key
        spec = dataclasses.replace(spec, ledger_dir=str(ledger))
        ds = stream_mod.stream_dataset(spec, stats)
        logger.info("Streaming %d files of %s as %d shards in %d parts (%d ranks x %d workers)%s; shard row counts "
                    "in %s.", len(urls), cfg.get("name") or "URLs", spec.num_shards, parts, world_size, workers,
                    ", repeating" if spec.repeat else "", ledger)
    else:
        if not cfg.get("name"):
            raise ValueError("data.kind=hub needs data.name (a hub dataset) and/or data.data_files (JSONL globs).")
        source = load_dataset(cfg["name"], cfg.get("config"), split=cfg.get("split", "train"), streaming=True,
                              revision=cfg.get("revision"))
        if buffer > 0:
            source = source.shuffle(seed=seed, buffer_size=buffer)
        if cfg.get("max_documents") is not None:
            source = source.take(int(cfg["max_documents"]))
        if cfg.get("repeat"):
            source = source.repeat(None)
        ds = process_stream(source, tokenizer, anchor, block_size, text_column=text_column,
                            packing=bool(cfg.get("packing", True)), keep_remainder=bool(cfg.get("keep_remainder", False)),
                            splitter=cfg.get("splitter"), batch_size=int(cfg.get("batch_size", 256)))
        logger.info("Streaming %s (%s/%s, %d shards): processed on the fly, nothing cached.", cfg["name"],
                    cfg.get("config"), cfg.get("split", "train"), ds.n_shards)
    logger.info("A stream has no length: the Trainer needs max_steps.")
    return ds, stats


def process_stream(
    source: Any, tokenizer: Any, anchor: AnchorConfig | None, block_size: int, *, text_column: str = "text",
    packing: bool = True, keep_remainder: bool = False, splitter: str | None = None, batch_size: int = 256,
) -> Any:
    """The same AC insertion, tokenisation and packing as the cached path, lazily on an ``IterableDataset``.

    The result keeps ``source``'s shards (each is processed and packed on its own), so ranks and
    DataLoader workers can read different shards.
    """
    from datasets import IterableDataset

    from .stream import StreamSpec

    check_anchor_tokenizer(tokenizer, anchor)
    columns = source.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(f"The data has no column {text_column!r}; its columns are {sorted(columns)}. "
                         "Set data.text_column to one of them.")
    spec = StreamSpec(tokenizer=tokenizer, anchor=anchor, block_size=block_size, text_column=text_column,
                      packing=packing, keep_remainder=keep_remainder, splitter=splitter, batch_size=batch_size)
    n = max(1, int(source.n_shards))
    return IterableDataset.from_generator(
        _gen_source_shards, gen_kwargs={"index": list(range(n)), "num_shards": n, "source": source, "spec": spec}
    )


def _gen_source_shards(index: list[int], num_shards: int, source: Any, spec: Any) -> Iterator[dict]:
    from .stream import rows_from_texts

    processor = TextProcessor(spec.tokenizer, spec.anchor, spec.text_column, spec.splitter)
    for i in index:
        part = source.shard(num_shards=num_shards, index=i) if num_shards > 1 else source

        def texts(part: Any = part) -> Iterator[str]:
            for row in part:
                if spec.text_column not in row:
                    processor({k: [v] for k, v in row.items()})  # raises the clear "no column" error
                yield row[spec.text_column]

        yield from rows_from_texts(texts(), spec, processor)
