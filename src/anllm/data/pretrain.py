"""Pretraining rows (kinds ``jsonl`` and ``demo``): documents read, split, tokenised with anchors, then
packed into blocks of ``block_size`` (or, with ``packing: false``, one document per row, cut)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ..anchors import AnchorConfig
from .arrow import count_rows, count_tokenized, from_generator, gen_rows, map_kwargs, write_packed
from .processing import TextProcessor, truncate_document
from .sources import SkipLogger, default_base_dir
from .split import iter_documents as split_documents
from .split import partition_files, select_split
from .stats import MAX_SKIP_EXAMPLES, DataStats, timed

READ_SHARD_BYTES = 256 * 2**20


def build_pretrain(
    cfg: dict, files: list[Path], tokenizer: Any, anchor: AnchorConfig | None, block_size: int,
    num_proc: int, split: str, work: Path, stats: DataStats,
) -> Any:
    """The rows of ``split`` in ``work`` (Arrow), counting into ``stats``."""
    from datasets import Features, Sequence, Value

    t = time.perf_counter()
    files, held_files = partition_files(files, cfg, cfg.get("base_dir") or default_base_dir())
    text_features = Features({"text": Value("string")})
    raw = None
    if files and cfg["kind"] == "jsonl" and num_proc > 1 and cfg.get("max_documents") is None:
        raw = _read_jsonl_parallel(cfg, files, stats, work, num_proc, text_features)
        raw = None if raw is None else select_split(raw, cfg, split)
    elif files or cfg["kind"] == "demo":
        raw = from_generator(gen_rows, text_features, work, make=_read_texts(cfg, files, stats))
        raw = None if raw is None else select_split(raw, cfg, split)
    if split == "holdout" and held_files:  # whole files held out (holdout_paths)
        whole = {**cfg, "kind": "jsonl", "max_documents": None}
        held = from_generator(gen_rows, text_features, work / "held", make=_read_texts(whole, held_files, stats))
        if held is not None:
            from datasets import concatenate_datasets

            raw = held if raw is None or len(raw) == 0 else concatenate_datasets([held, raw])
    if raw is None or len(raw) == 0:
        raise ValueError(
            f"No usable document in the {cfg['kind']} data ({split} split; {stats.num_skipped} skipped: "
            f"{stats.skipped}; first: {stats.skipped_examples[:3]})."
        )
    timed(stats, "read")(t)

    t = time.perf_counter()
    processor = TextProcessor(tokenizer, anchor, "text", cfg.get("splitter"))
    tok_features = Features({"input_ids": Sequence(Value("int32")), "n_anchors": Value("int32"),
                             "n_sentences": Value("int32")})
    tokenized = raw.map(processor, remove_columns=raw.column_names, features=tok_features,
                        **map_kwargs(num_proc, cfg, "AC insertion + tokenisation" if processor.token else "tokenisation"))
    timed(stats, "tokenize")(t)

    t = time.perf_counter()
    lengths = count_tokenized(tokenized, stats, anchor)
    row_features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                             "document_ids": Sequence(Value("int32"))})
    if cfg.get("packing", True):
        ds = write_packed(tokenized, block_size, bool(cfg.get("keep_remainder", False)), work / "packed.arrow")
        if ds is None:
            raise ValueError(
                f"All {stats.tokens} tokens fit in less than one block of block_size={block_size}, so packing "
                "produced no row. Use more documents, a smaller block_size, or data.keep_remainder=true."
            )
    else:
        stats.truncated = int((lengths > block_size).sum())

        def truncate(batch: dict[str, list]) -> dict[str, list]:
            rows = [truncate_document(ids, block_size) for ids in batch["input_ids"] if len(ids)]
            return {k: [r[k] for r in rows] for k in ("input_ids", "labels", "document_ids")}

        ds = tokenized.map(truncate, remove_columns=tokenized.column_names, features=row_features,
                           **map_kwargs(num_proc, cfg, "truncation"))
    timed(stats, "pack" if cfg.get("packing", True) else "truncate")(t)
    count_rows(ds, stats)
    stats.dropped_tokens = stats.tokens - stats.row_tokens
    return ds


def _read_texts(cfg: dict, files: list[Path], stats: DataStats) -> Callable[[], Iterator[dict]]:
    """Rows ``{"text"}`` in the order :func:`.split.held_out_documents` reads them (one reader)."""
    return lambda: ({"text": text} for _, text in split_documents(cfg, files, stats))


def _read_jsonl_parallel(cfg: dict, files: list[Path], stats: DataStats, work: Path, num_proc: int,
                         features: Any) -> Any:
    """Rows ``{"text"}`` of JSONL files read by ``num_proc`` processes, in the same order as one reader.

    The files are cut into byte ranges (:func:`.stream.plan_shards`; a line belongs to the range it
    starts in), each process reads a contiguous run of them, and their skip counts come back through
    small JSON files in ``work``.
    """
    from datasets.exceptions import DatasetGenerationError

    from .retry import RetryPolicy
    from .stream import plan_shards

    sizes = [(str(p), p.stat().st_size) for p in files]
    total = sum(s for _, s in sizes)
    shards = plan_shards(sizes, max(4 * num_proc, -(-total // READ_SHARD_BYTES)))
    side = work / "read-stats"
    side.mkdir(parents=True, exist_ok=True)
    try:
        raw = from_generator(_gen_jsonl_shards, features, work, num_proc=min(num_proc, len(shards)), shards=shards,
                              shard_ids=list(range(len(shards))), text_column=cfg.get("text_column", "text"),
                              side=str(side), policy=RetryPolicy.from_config(cfg.get("retry")))
    except DatasetGenerationError:
        for err in sorted(side.glob("error-*.json")):
            info = json.loads(err.read_text())
            kind = {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}.get(info["type"], OSError)
            raise kind(info["message"]) from None
        raise
    for part in sorted(side.glob("stats-*.json")):
        info = json.loads(part.read_text())
        for reason, count in info["skipped"].items():
            stats.skipped[reason] = stats.skipped.get(reason, 0) + count
        room = MAX_SKIP_EXAMPLES - len(stats.skipped_examples)
        stats.skipped_examples.extend(info["examples"][:max(0, room)])
    return raw


def _gen_jsonl_shards(shards: list, shard_ids: list[int], text_column: str, side: str, policy: Any) -> Iterator[dict]:
    from .sources import iter_segment_documents

    local = DataStats()
    skip = SkipLogger(local)
    name = f"{shard_ids[0]:06d}" if shard_ids else "empty"
    try:
        for segments in shards:
            for _, text in iter_segment_documents(segments, text_column, skip, None, policy):
                yield {"text": text}
    except (ValueError, OSError) as e:  # passed to the parent as is (datasets wraps it in a RemoteTraceback)
        (Path(side) / f"error-{name}.json").write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))
        raise
    (Path(side) / f"stats-{name}.json").write_text(json.dumps({"skipped": local.skipped,
                                                                "examples": local.skipped_examples}))
