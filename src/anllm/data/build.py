"""``build_train_dataset``: from a data config to a tokenised, anchored, packed and cached dataset.

Kinds (``data_cfg["kind"]``):

* ``jsonl`` — local JSONL files (``paths``: files/globs, relative to ``base_dir``), one document per
  line in ``text_column``; with ``num_proc > 1`` read by that many processes (byte ranges of the
  files, same row order) as well as tokenised by them.
* ``demo``  — the offline English corpus from Python's own docs (:mod:`anllm.data.demo`).
* ``hub``   — streamed from the hub, returned as an ``IterableDataset`` processed on the fly (no rows
  cached; the Trainer then needs ``max_steps``): either JSONL files read line by line (``data_files``:
  globs inside the dataset repo ``name``, or full fsspec URLs) — the way to read
  RedPajama-Data-1T-Sample, whose loading script datasets>=4 no longer runs — split into one part
  per rank and DataLoader worker, resumable without replay and retried on transient read errors
  (:mod:`anllm.data.stream`; ``repeat``, ``shard_mb``, ``retry``), or any script-free hub dataset
  through ``datasets.load_dataset(name, config, split=..., streaming=True)`` (its own shards).
* ``sft``   — Alpaca JSON (``alpaca_path``) and/or De->En JSONL (``parallel_path``) examples with the
  loss on the response only (:mod:`anllm.data.sft`).

Pretraining rows are ``{"input_ids", "labels", "document_ids"}`` blocks of exactly ``block_size``
tokens (``packing: true``; with ``keep_remainder: true`` the last block may be shorter), or with
``packing: false`` the authors' one document per row cut to ``block_size`` (variable length; the
collator pads). SFT rows are ``{"input_ids", "labels"}``.

This module checks the request, makes the cache key and dispatches; the work is in
:mod:`.pretrain`, :mod:`.sft_dataset` and :mod:`.hub`, with the cache in :mod:`.store` and the
Arrow I/O in :mod:`.arrow`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

from ..anchors import AnchorConfig
from ..schema.core import plain_dict
from . import store
from .hub import build_hub
from .pretrain import build_pretrain
from .processing import check_anchor_tokenizer
from .sft_dataset import build_sft
from .sources import default_base_dir, resolve_paths
from .split import SPLITS, has_holdout, holdout_settings
from .stats import DataStats

logger = logging.getLogger("anllm.data")

KINDS = ("jsonl", "demo", "hub", "sft")


def build_train_dataset(
    data_cfg: Mapping,
    tokenizer: Any,
    anchor: AnchorConfig | None,
    block_size: int,
    cache_dir: str | Path,
    seed: int = 0,
    num_proc: int = 1,
    max_model_length: int | None = None,
    *,
    split: str = "train",
    world_size: int | None = None,
    num_workers: int = 0,
) -> tuple[Any, DataStats]:
    """Build (or load from ``cache_dir``) the training rows described by ``data_cfg``.

    ``split="holdout"`` returns the documents held out by ``holdout_fraction`` instead (same
    processing), for evaluation. Returns ``(dataset, stats)``; ``stats`` is also logged.
    ``num_proc`` processes read (JSONL, split by byte ranges) and tokenise. Streams (kind=hub) are
    split into ``world_size`` (default: ``$WORLD_SIZE`` or 1) x ``num_workers`` (the Trainer's
    ``dataloader_num_workers``; 0 counts as 1) parts, one per rank and DataLoader worker.
    """
    cfg = plain_dict(data_cfg)
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise ValueError(f"Unknown data kind {kind!r}: set data.kind to one of {KINDS}.")
    from ..schema.train import data_keys  # the one list of a kind's keys (the config schema)

    unknown = sorted(set(cfg) - set(data_keys(kind)))
    if unknown:  # direct API callers; train.py/evaluate.py refuse unknown keys before this
        logger.warning("Data config keys %s are not used by kind %r (known: %s).", unknown, kind, sorted(data_keys(kind)))
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    block_size = int(block_size)
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 tokens, got {block_size}.")
    if max_model_length is not None and block_size > int(max_model_length):
        raise ValueError(
            f"block_size={block_size} is larger than the model's maximum length {max_model_length} "
            f"(max_position_embeddings). Use a smaller block, e.g. the override block_size={max_model_length}."
        )
    frac, _, held_paths = holdout_settings(cfg)
    if split == "holdout" and not has_holdout(cfg):
        raise ValueError("split='holdout' needs data.holdout_fraction > 0 or data.holdout_paths.")
    check_anchor_tokenizer(tokenizer, anchor)
    mode = anchor.mode if anchor is not None else "none"
    num_proc = max(1, int(num_proc or 1))

    if kind == "hub":
        if frac or held_paths or split != "train":
            raise ValueError("Streamed hub data cannot hold out documents; drop data.holdout_fraction/holdout_paths "
                             "(evaluate on a local jsonl slice instead).")
        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        return build_hub(cfg, tokenizer, anchor, block_size, seed, cache_dir, max(1, int(world_size)), num_workers)

    base_dir = cfg.get("base_dir") or default_base_dir()
    if kind == "jsonl":
        files = resolve_paths(cfg.get("paths") or [], base_dir)
    elif kind == "sft":
        named = [cfg[k] for k in ("alpaca_path", "parallel_path") if cfg.get(k)]
        if not named:
            raise ValueError("data.kind=sft needs data.alpaca_path and/or data.parallel_path.")
        files = resolve_paths(named, base_dir)
    else:
        files = []
    key_parts = {
        # only what changes the rows (a new name, batch size or attention option reuses the entry)
        "cfg": {k: v for k, v in cfg.items() if k not in ("base_dir", "description", "id", "name", "batch_size", "retry")},
        "files": store.file_identity(files),
        "tokenizer": store.tokenizer_identity(tokenizer),
        "anchor": store.anchor_identity(anchor),
        "block_size": block_size,
        "seed": seed if kind == "sft" else None,  # only SFT shuffles
        "split": split,
        "row_format": store.ROW_FORMAT,
    }
    if kind == "demo":
        import sys

        key_parts["python"] = sys.version  # the corpus ships with Python
    entry = Path(cache_dir).expanduser() / f"{kind}-{mode}-{split}-{store.cache_key(key_parts)}"
    cached = store.load_entry(entry)
    if cached is not None:
        cached[1].log()
        return cached
    store.check_space(entry.parent, files)

    def build(work: Path) -> tuple[Any, DataStats]:
        stats = DataStats(kind=kind, split=split, mode=mode, num_proc=num_proc, block_size=block_size)
        t0 = time.perf_counter()
        if kind == "sft":
            ds = build_sft(cfg, files, tokenizer, anchor, block_size, seed, num_proc, split, work, stats)
        else:
            ds = build_pretrain(cfg, files, tokenizer, anchor, block_size, num_proc, split, work, stats)
        stats.seconds = time.perf_counter() - t0
        return ds, stats

    ds, stats = store.build_entry(entry, key_parts, build)
    stats.log()
    return ds, stats
