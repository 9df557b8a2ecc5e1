"""Held-out documents for the long-text readings: the perplexity suite, the recall probe, the
long-range suite and the training run's held-out check.

Documents come from ``data_dir/pretrain_text`` (RedPajama layout ``{"text", "meta"}``): pick held-out
ones with ``ppl.where`` (e.g. ``{meta.source: nltk_inaugural}``) and ``ppl.select``, or read the
held-out split of a training data config (task ``holdout`` and ``ppl.data``; ``recall.data``,
``longrange.data``; see :mod:`anllm.data.split`). Every function returns ``(doc_id, text)`` pairs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..anchors import sentence_spans
from ..schema.core import plain
from .methods import opt

# task -> file under data_dir
TASKS: dict[str, str] = {
    "speeches": "pretrain_text/us_presidential_speeches_nltk.jsonl",
    "gutenberg": "pretrain_text/gutenberg_books.jsonl",
    "wikipedia": "pretrain_text/wikipedia_enwiki_sample.jsonl",
    "abc_news": "pretrain_text/abc_news_nltk.jsonl",
    "lee_news": "pretrain_text/lee_background_news.jsonl",
}
HOLDOUT_TASK = "holdout"  # the held-out split of ``ppl.data`` (a training data config)
SELECT = ("first", "last", "spread")
SPEECHES = TASKS["speeches"]  # the default prose of the recall probe and the long-range suite


def _get_path(record: dict[str, Any], key: str) -> Any:
    cur: Any = record
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def load_documents(
    task: str,
    data_dir: str | Path | None,
    *,
    limit: int | None = None,
    where: dict[str, Any] | None = None,
    select: str = "last",
    min_chars: int = 2000,
) -> list[tuple[str, str]]:
    """``(doc_id, text)`` of ``task``'s documents matching ``where`` (``{"meta.source": "nltk_inaugural"}``;
    a value may be a list), at least ``min_chars`` long; ``select="last"`` takes the file's last
    ``limit`` documents (a hold-out), ``"first"`` the first."""
    if task not in TASKS:
        raise ValueError(f"Unknown perplexity task {task!r}: choose one of {sorted(TASKS)}.")
    if data_dir is None:
        raise FileNotFoundError(
            f"The perplexity suite reads {TASKS[task]} from data_dir: pass data_dir=../shared/data."
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {root} does not exist. Pass data_dir=../shared/data (relative to the repo).")
    path = root / TASKS[task]
    if not path.is_file():
        raise FileNotFoundError(f"{task}: {path} not found under data_dir {root} (expected {TASKS[task]}).")
    if select not in SELECT:
        raise ValueError(f"ppl.select must be one of {SELECT}, got {select!r}.")
    docs: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            rec = json.loads(line)
            ok = True
            for key, want in (where or {}).items():
                got = _get_path(rec, key)
                wants = list(want) if isinstance(want, (list, tuple)) else [want]
                if got not in wants and str(got) not in [str(w) for w in wants]:
                    ok = False
                    break
            if ok and len(rec.get("text", "")) >= min_chars:
                meta = rec.get("meta", {}) or {}
                doc_id = str(meta.get("title") or meta.get("file") or f"{path.stem}:{n}")
                if "chunk" in meta:
                    doc_id += f"#{meta['chunk']}"
                docs.append((doc_id, rec["text"]))
    if not docs:
        raise ValueError(f"{task}: no document in {path} matches ppl.where={where} with at least {min_chars} characters.")
    return select_documents(docs, limit, select, min_chars)


def select_documents(docs: list[tuple[str, str]], limit: int | None, select: str, min_chars: int) -> list[tuple[str, str]]:
    """Documents of at least ``min_chars``; ``limit`` of them: the ``first``, the ``last`` or ``spread``
    evenly over the list (mixes the sources of a held-out split)."""
    if select not in SELECT:
        raise ValueError(f"ppl.select must be one of {SELECT}, got {select!r}.")
    docs = [d for d in docs if len(d[1]) >= min_chars]
    if limit is None or limit >= len(docs):
        return docs
    if select == "first":
        return docs[:limit]
    if select == "last":
        return docs[-limit:]
    step = len(docs) / limit
    return [docs[int(i * step)] for i in range(limit)]


def documents_for(cfg: Any, task: str) -> list[tuple[str, str]]:
    """The documents ``task`` scores under this run config (``ppl.*`` selects them)."""
    pcfg = opt(cfg, "ppl", {})
    limit = opt(cfg, "limit", opt(pcfg, "num_documents", 8))
    select = str(opt(pcfg, "select", "last"))
    min_chars = int(opt(pcfg, "min_chars", 2000))
    if task == HOLDOUT_TASK:
        from ..data.split import held_out_documents

        docs = held_out_documents(plain(opt(pcfg, "data")), opt(pcfg, "data_base_dir"))
        chosen = select_documents(docs, int(limit) if limit is not None else None, select, min_chars)
        if not chosen:
            raise ValueError(f"ppl.data holds out no document of at least {min_chars} characters (ppl.min_chars).")
        return chosen
    where = plain(opt(pcfg, "where"))
    if where is not None and not isinstance(where, dict):
        raise ValueError(f"ppl.where must be a mapping such as {{meta.source: nltk_inaugural}}, got {where!r}.")
    return load_documents(task, opt(cfg, "data_dir"), limit=limit, where=where, select=select, min_chars=min_chars)


def held_out_prose(cfg: Any, section: str, reader: str) -> list[tuple[str, str]]:
    """The documents ``cfg.<section>`` reads prose from (the recall probe, the long-range suite): the
    held-out split of ``<section>.data`` (a training data config, read from ``<section>.data_base_dir``),
    or by default ``data_dir``'s presidential speeches (which the study's data config holds out whole).
    ``reader`` names the reader in the error ("The recall probe")."""
    from ..data.split import held_out_documents

    options = plain(opt(cfg, section, {})) or {}
    data = options.get("data")
    if data is None:
        if not cfg.get("data_dir"):
            raise FileNotFoundError(f"{reader} reads held-out prose: pass {section}.data=<data config> or "
                                    "data_dir=../shared/data (its presidential speeches).")
        path = str(Path(str(cfg.get("data_dir"))).expanduser() / SPEECHES)
        data = {"kind": "jsonl", "paths": [path], "holdout_paths": [path]}
    return held_out_documents(data, options.get("data_base_dir"))


def prose_sentences(docs: Sequence[tuple[str, str]], min_chars: int = 40, max_chars: int = 200) -> list[list[str]]:
    """Runs of consecutive, ordinary sentences (one line, a letter first, moderate length) per document."""
    runs: list[list[str]] = []
    for _, text in docs:
        run: list[str] = []
        for s, e in sentence_spans(text):
            sent = text[s:e]
            ok = min_chars <= len(sent) <= max_chars and "\n" not in sent and sent[0].isupper() and sent[-1] in ".!?"
            if ok:
                run.append(sent)
            elif run:
                runs.append(run)
                run = []
        if run:
            runs.append(run)
    return runs
