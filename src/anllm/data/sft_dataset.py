"""SFT rows (kind ``sft``): Alpaca and De->En examples, shuffled, split, formatted with their anchors by
:class:`~anllm.data.sft.SFTProcessor` (loss on the response only), counted, and the unusable dropped."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..anchors import AnchorConfig
from .arrow import count_rows, from_generator, gen_rows, map_kwargs
from .sft import SFTProcessor
from .sources import SkipLogger, iter_alpaca, iter_parallel
from .split import select_split
from .stats import DataStats, timed


def build_sft(
    cfg: dict, files: list[Path], tokenizer: Any, anchor: AnchorConfig | None, block_size: int, seed: int,
    num_proc: int, split: str, work: Path, stats: DataStats,
) -> Any:
    """The SFT rows of ``split`` in ``work`` (Arrow), counting into ``stats``; ``seed`` shuffles the sources together."""
    from datasets import Features, Sequence, Value

    t = time.perf_counter()
    skip = SkipLogger(stats)
    by_name = dict(zip([k for k in ("alpaca_path", "parallel_path") if cfg.get(k)], files))

    def records() -> Iterator[dict]:
        if "alpaca_path" in by_name:
            yield from iter_alpaca(by_name["alpaca_path"], skip)
        if "parallel_path" in by_name:
            yield from iter_parallel(by_name["parallel_path"], skip)

    features = Features({k: Value("string") for k in ("instruction", "input", "output")})
    raw = from_generator(gen_rows, features, work, make=records)
    if raw is None:
        raise ValueError(f"No usable SFT example ({stats.num_skipped} skipped: {stats.skipped}).")
    raw = raw.shuffle(seed=seed)  # mixes the two sources before max_examples picks a subset
    if cfg.get("max_examples") is not None:
        raw = raw.select(range(min(int(cfg["max_examples"]), len(raw))))
    raw = select_split(raw, cfg, split)
    timed(stats, "read")(t)

    t = time.perf_counter()
    processor = SFTProcessor(tokenizer, anchor, block_size, cfg.get("splitter"), cfg.get("sft_template") or "anllm")
    out_features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                             "n_tokens": Value("int32"), "n_anchors": Value("int32"), "n_sentences": Value("int32"),
                             "truncated": Value("bool"), "status": Value("string")})
    done = raw.map(processor, remove_columns=raw.column_names, features=out_features,
                   **map_kwargs(num_proc, cfg, "SFT formatting + tokenisation"))
    timed(stats, "tokenize")(t)

    import pyarrow.compute as pc

    sentences, offset = 0, 0
    for table in done.with_format("arrow").iter(batch_size=65536):
        ok = pc.equal(table.column("status"), "")
        for i in np.flatnonzero(~ok.to_numpy(zero_copy_only=False)):
            stats.skip("prompt fills block_size", f"example {offset + i} ({table.column('status')[int(i)].as_py()})")
        offset += table.num_rows
        stats.documents += int(pc.sum(ok).as_py() or 0)
        stats.tokens += int(pc.sum(table.column("n_tokens")).as_py() or 0)
        stats.anchors += int(pc.sum(table.column("n_anchors")).as_py() or 0)
        stats.truncated += int(pc.sum(table.column("truncated")).as_py() or 0)
        sentences += int(pc.sum(pc.max_element_wise(table.column("n_sentences"), 0)).as_py() or 0)
    stats.sentences = sentences if anchor is not None and anchor.mode == "ac" else None
    if stats.documents == 0:
        raise ValueError(f"Every SFT example was skipped: {stats.skipped}; raise block_size.")
    ds = done.filter(lambda s: s == "", input_columns="status")
    ds = ds.remove_columns(["n_tokens", "n_anchors", "n_sentences", "truncated", "status"])
    count_rows(ds, stats)
    stats.dropped_tokens = stats.tokens - stats.row_tokens
    return ds
