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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..anchors import AnchorConfig
from . import cache as cache_mod
from .processing import TextProcessor, check_anchor_tokenizer, pack_documents, truncate_document
from .sft import SFTProcessor
from .sources import SkipLogger, iter_alpaca, iter_parallel, resolve_paths, resolve_remote
from .split import SPLITS, has_holdout, holdout_settings, partition_files, split_indices
from .split import iter_documents as split_documents
from .stats import MAX_SKIP_EXAMPLES, DataStats

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
    cfg = _plain(data_cfg)
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
        return _build_hub(cfg, tokenizer, anchor, block_size, seed, cache_dir, max(1, int(world_size)), num_workers)

    base_dir = cfg.get("base_dir") or _default_base_dir()
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
        "files": cache_mod.file_identity(files),
        "tokenizer": cache_mod.tokenizer_identity(tokenizer),
        "anchor": _anchor_key(anchor),
        "block_size": block_size,
        "seed": seed if kind == "sft" else None,  # only SFT shuffles
        "split": split,
        "code": cache_mod.code_version(),
    }
    if kind == "demo":
        import sys

        key_parts["python"] = sys.version  # the corpus ships with Python
    entry = Path(cache_dir).expanduser() / f"{kind}-{mode}-{split}-{cache_mod.cache_key(key_parts)}"
    cached = cache_mod.load_entry(entry)
    if cached is not None:
        cached[1].log()
        return cached
    _check_cache_space(entry.parent, files)

    def build(work: Path) -> tuple[Any, DataStats]:
        stats = DataStats(kind=kind, split=split, mode=mode, num_proc=num_proc, block_size=block_size)
        t0 = time.perf_counter()
        if kind == "sft":
            ds = _build_sft(cfg, files, tokenizer, anchor, block_size, seed, num_proc, split, work, stats)
        else:
            ds = _build_pretrain(cfg, files, tokenizer, anchor, block_size, num_proc, split, work, stats)
        stats.seconds = time.perf_counter() - t0
        return ds, stats

    ds, stats = cache_mod.build_entry(entry, key_parts, build)
    stats.log()
    return ds, stats


# --- helpers -----------------------------------------------------------------------------------


def _plain(cfg: Mapping) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def _default_base_dir() -> Path:
    """Hydra's original working directory when running under Hydra, else the current one."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd

        if HydraConfig.initialized():
            return Path(get_original_cwd())
    except ImportError:  # pragma: no cover
        pass
    return Path.cwd()


def _check_cache_space(cache_dir: Path, files: list[Path]) -> None:
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


def _timed(stats: DataStats, stage: str) -> Callable[[float], None]:
    def done(t0: float) -> None:
        stats.stage_seconds[stage] = round(time.perf_counter() - t0, 4)

    return done


def _from_generator(gen: Callable[..., Iterator[dict]], features: Any, work: Path, num_proc: int | None = None,
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


def _gen_rows(make: Callable[[], Iterator[dict]]) -> Iterator[dict]:
    yield from make()


def _split_holdout(ds: Any, cfg: dict, split: str) -> Any:
    """The rows of ``split`` among documents sampled by ``holdout_fraction`` (see :mod:`.split`)."""
    frac, seed, _ = holdout_settings(cfg)
    if frac == 0.0 and split == "train":
        return ds
    return ds.select(split_indices(len(ds), frac, seed, split).tolist())


def _read_texts(cfg: dict, files: list[Path], stats: DataStats) -> Callable[[], Iterator[dict]]:
    """Rows ``{"text"}`` in the order :func:`.split.held_out_documents` reads them (one reader)."""
    return lambda: ({"text": text} for _, text in split_documents(cfg, files, stats))


READ_SHARD_BYTES = 256 * 2**20


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
        raw = _from_generator(_gen_jsonl_shards, features, work, num_proc=min(num_proc, len(shards)), shards=shards,
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


def _map_kwargs(num_proc: int, cfg: dict, desc: str) -> dict[str, Any]:
    return {"batched": True, "batch_size": int(cfg.get("batch_size", 256)),
            "num_proc": num_proc if num_proc > 1 else None, "desc": desc}


def _build_pretrain(
    cfg: dict, files: list[Path], tokenizer: Any, anchor: AnchorConfig | None, block_size: int,
    num_proc: int, split: str, work: Path, stats: DataStats,
) -> Any:
    from datasets import Features, Sequence, Value

    t = time.perf_counter()
    files, held_files = partition_files(files, cfg, cfg.get("base_dir") or _default_base_dir())
    text_features = Features({"text": Value("string")})
    raw = None
    if files and cfg["kind"] == "jsonl" and num_proc > 1 and cfg.get("max_documents") is None:
        raw = _read_jsonl_parallel(cfg, files, stats, work, num_proc, text_features)
        raw = None if raw is None else _split_holdout(raw, cfg, split)
    elif files or cfg["kind"] == "demo":
        raw = _from_generator(_gen_rows, text_features, work, make=_read_texts(cfg, files, stats))
        raw = None if raw is None else _split_holdout(raw, cfg, split)
    if split == "holdout" and held_files:  # whole files held out (holdout_paths)
        whole = {**cfg, "kind": "jsonl", "max_documents": None}
        held = _from_generator(_gen_rows, text_features, work / "held", make=_read_texts(whole, held_files, stats))
        if held is not None:
            from datasets import concatenate_datasets

            raw = held if raw is None or len(raw) == 0 else concatenate_datasets([held, raw])
    if raw is None or len(raw) == 0:
        raise ValueError(
            f"No usable document in the {cfg['kind']} data ({split} split; {stats.num_skipped} skipped: "
            f"{stats.skipped}; first: {stats.skipped_examples[:3]})."
        )
    _timed(stats, "read")(t)

    t = time.perf_counter()
    processor = TextProcessor(tokenizer, anchor, "text", cfg.get("splitter"))
    tok_features = Features({"input_ids": Sequence(Value("int32")), "n_anchors": Value("int32"),
                             "n_sentences": Value("int32")})
    tokenized = raw.map(processor, remove_columns=raw.column_names, features=tok_features,
                        **_map_kwargs(num_proc, cfg, "AC insertion + tokenisation" if processor.token else "tokenisation"))
    _timed(stats, "tokenize")(t)

    t = time.perf_counter()
    lengths = _count_tokenized(tokenized, stats, anchor)
    row_features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                             "document_ids": Sequence(Value("int32"))})
    if cfg.get("packing", True):
        ds = _write_packed(tokenized, block_size, bool(cfg.get("keep_remainder", False)), work / "packed.arrow")
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
                           **_map_kwargs(num_proc, cfg, "truncation"))
    _timed(stats, "pack" if cfg.get("packing", True) else "truncate")(t)
    _count_rows(ds, stats)
    stats.dropped_tokens = stats.tokens - stats.row_tokens
    return ds


def _iter_token_arrays(tokenized: Any, column: str = "input_ids") -> Iterator[np.ndarray]:
    """Every row's ids as a numpy array, read batch-wise from Arrow without Python lists."""
    import pyarrow.compute as pc

    for table in tokenized.with_format("arrow").iter(batch_size=4096):
        col = table.column(column).combine_chunks()
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        lens = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        yield from np.split(flat, np.cumsum(lens)[:-1])


def _write_packed(tokenized: Any, block_size: int, keep_remainder: bool, path: Path, rows_per_batch: int = 256) -> Any:
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
        for block in pack_documents(_iter_token_arrays(tokenized), block_size, keep_remainder):
            pending.append(block)
            if len(pending) == rows_per_batch:
                writer.write_batch(batch())
                n_rows += len(pending)
                pending = []
        if pending:
            writer.write_batch(batch())
            n_rows += len(pending)
    return Dataset.from_file(str(path)) if n_rows else None


def _count_tokenized(tokenized: Any, stats: DataStats, anchor: AnchorConfig | None) -> np.ndarray:
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


def _count_rows(ds: Any, stats: DataStats) -> None:
    import pyarrow.compute as pc

    stats.rows = len(ds)
    for table in ds.with_format("arrow").iter(batch_size=4096):
        stats.row_tokens += int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
        labels = pc.list_flatten(table.column("labels"))
        stats.loss_tokens += int(pc.sum(pc.not_equal(labels, -100)).as_py() or 0)


# --- SFT ---------------------------------------------------------------------------------------


def _build_sft(
    cfg: dict, files: list[Path], tokenizer: Any, anchor: AnchorConfig | None, block_size: int, seed: int,
    num_proc: int, split: str, work: Path, stats: DataStats,
) -> Any:
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
    raw = _from_generator(_gen_rows, features, work, make=records)
    if raw is None:
        raise ValueError(f"No usable SFT example ({stats.num_skipped} skipped: {stats.skipped}).")
    raw = raw.shuffle(seed=seed)  # mixes the two sources before max_examples picks a subset
    if cfg.get("max_examples") is not None:
        raw = raw.select(range(min(int(cfg["max_examples"]), len(raw))))
    raw = _split_holdout(raw, cfg, split)
    _timed(stats, "read")(t)

    t = time.perf_counter()
    processor = SFTProcessor(tokenizer, anchor, block_size, cfg.get("splitter"), cfg.get("sft_template") or "anllm")
    out_features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                             "n_tokens": Value("int32"), "n_anchors": Value("int32"), "n_sentences": Value("int32"),
                             "truncated": Value("bool"), "status": Value("string")})
    done = raw.map(processor, remove_columns=raw.column_names, features=out_features,
                   **_map_kwargs(num_proc, cfg, "SFT formatting + tokenisation"))
    _timed(stats, "tokenize")(t)

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
    _count_rows(ds, stats)
    stats.dropped_tokens = stats.tokens - stats.row_tokens
    return ds


# --- hub streaming -----------------------------------------------------------------------------


def _build_hub(cfg: dict, tokenizer: Any, anchor: AnchorConfig | None, block_size: int, seed: int,
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
            "shards": spec.shards, "sizes": files, "tokenizer": cache_mod.tokenizer_identity(tokenizer),
            "anchor": _anchor_key(anchor), "block_size": block_size, "code": cache_mod.code_version(),
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


def _anchor_key(anchor: AnchorConfig | None) -> dict[str, Any]:
    return {k: v for k, v in (anchor.to_dict() if anchor else {}).items()
            if k in ("mode", "anchor_token", "anchor_token_ids", "ac_after_last", "ac_join")}


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
