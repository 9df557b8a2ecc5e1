"""The held-out split: which documents training never sees, defined once for training and evaluation.

A data config holds documents out in two ways (both optional, combinable):

* ``holdout_paths``: files (or globs) held out *entirely* — a whole source the model never trains on;
* ``holdout_fraction`` (+ ``holdout_seed``, default 0): a fixed random sample of the remaining
  documents (a seeded permutation over their order, independent of the training seed, so every run
  of the same data config holds out the same documents).

``build_train_dataset(split="train")`` trains on the rest; :func:`held_out_documents` returns the
held-out texts for evaluation (``evaluate.py suite=ppl tasks=[holdout] ppl.data=...``, the held-out
check at the end of training, the study's recall probe). Both go through :func:`split_indices` and
:func:`partition_files`, so they cannot disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .sources import SkipLogger, iter_jsonl_documents, resolve_paths
from .stats import DataStats

SPLITS = ("train", "holdout")


def holdout_settings(cfg: Mapping[str, Any]) -> tuple[float, int, list[str]]:
    """``(fraction, seed, holdout_paths)`` of a data config, validated."""
    frac = float(cfg.get("holdout_fraction") or 0.0)
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {frac}.")
    paths = cfg.get("holdout_paths") or []
    paths = [paths] if isinstance(paths, (str, Path)) else [str(p) for p in paths]
    return frac, int(cfg.get("holdout_seed") or 0), paths


def has_holdout(cfg: Mapping[str, Any]) -> bool:
    frac, _, paths = holdout_settings(cfg)
    return frac > 0 or bool(paths)


def split_indices(n: int, fraction: float, seed: int, split: str) -> np.ndarray:
    """Sorted indices (of ``n`` documents) that belong to ``split`` under ``fraction``/``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if fraction == 0.0:
        return np.arange(n) if split == "train" else np.zeros(0, dtype=np.int64)
    n_hold = max(1, round(fraction * n))
    if n_hold >= n:
        raise ValueError(f"holdout_fraction={fraction} leaves no training documents out of {n}.")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:n_hold] if split == "holdout" else perm[n_hold:])


def select_split(ds: Any, cfg: dict, split: str) -> Any:
    """The rows of ``split`` among documents sampled by ``holdout_fraction`` (a ``datasets.Dataset`` of documents in reading order)."""
    frac, seed, _ = holdout_settings(cfg)
    if frac == 0.0 and split == "train":
        return ds
    return ds.select(split_indices(len(ds), frac, seed, split).tolist())


def partition_files(files: list[Path], cfg: Mapping[str, Any], base_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """``(sampled_files, held_files)``: files held out entirely (``holdout_paths``) vs the others.

    A held-out file need not be listed in ``paths``; it is never trained on either way.
    """
    _, _, patterns = holdout_settings(cfg)
    held = resolve_paths(patterns, base_dir) if patterns else []
    held_set = {p.resolve() for p in held}
    return [f for f in files if f.resolve() not in held_set], held


def iter_documents(cfg: Mapping[str, Any], files: list[Path], stats: DataStats) -> Iterator[tuple[str, str]]:
    """``(doc_id, text)`` in reading order, after ``max_documents`` (as training reads them)."""
    max_docs = cfg.get("max_documents")
    max_docs = int(max_docs) if max_docs is not None else None
    if cfg["kind"] == "jsonl":
        for where, text in iter_jsonl_documents(files, cfg.get("text_column", "text"), SkipLogger(stats), max_docs):
            path, _, line = where.rpartition(":")
            yield f"{Path(path).stem}:{line}", text
    elif cfg["kind"] == "demo":
        from .demo import demo_documents

        for i, text in enumerate(demo_documents()):
            if max_docs is not None and i >= max_docs:
                return
            yield f"demo:{i}", text
    else:
        raise ValueError(f"Held-out documents come from local data (kind jsonl or demo), not kind {cfg['kind']!r}.")


def held_out_documents(cfg: Mapping[str, Any], base_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """``(doc_id, text)`` of every held-out document of a data config: whole held-out files first, then
    the sampled documents in reading order. Raises when the config holds nothing out."""
    cfg = dict(cfg)
    if not has_holdout(cfg):
        raise ValueError(
            "This data config holds no documents out: set data.holdout_fraction (e.g. 0.02) and/or "
            "data.holdout_paths (files never trained on)."
        )
    base = Path(base_dir or cfg.get("base_dir") or Path.cwd())
    files = resolve_paths(cfg.get("paths") or [], base) if cfg["kind"] == "jsonl" else []
    sampled_files, held_files = partition_files(files, cfg, base)
    stats = DataStats(kind=cfg["kind"], split="holdout")
    out: list[tuple[str, str]] = []
    if held_files:
        out += list(iter_documents({**cfg, "kind": "jsonl", "max_documents": None}, held_files, stats))
    frac, seed, _ = holdout_settings(cfg)
    if frac > 0 and (sampled_files or cfg["kind"] == "demo"):
        docs = list(iter_documents(cfg, sampled_files, stats))
        out += [docs[i] for i in split_indices(len(docs), frac, seed, "holdout")]
    return out
