"""Long-range retrieval suite: tasks a local window cannot fake (passkey, multi-key needle, variable tracking).

The items (:mod:`anllm.eval.haystacks`) are haystacks of held-out prose of about ``N`` tokens with
"needle" sentences inserted, then a question and an open cue; the model must produce the answer (a
number) right after the cue. ``passkey`` is read at every depth of ``longrange.depths``;
``multikey`` (RULER's multi-key needle) and ``vartrack`` (RULER's variable tracking) place their
needles at random depths.

Scoring is **teacher-forced exact match**: the context and the answer's tokens (" 48213") are read
in one forward and an item counts as correct iff the model's argmax at every answer position is the
next answer token, which is exactly when greedy decoding produces the answer. The answer tokens are
part of the open sentence (no anchor after the cue), so reading them through the lossless
:class:`anllm.AnchorCache` in the same forward is the anchor-cache decode (tested against
``model.generate``).

Methods as in the recall probe and the perplexity suite: ``full`` (causal, everything cached),
``anchor`` (AnSAN + AnchorCache), ``sentence`` (control: earlier anchors hidden), ``ansan`` (the
AnSAN mask without a cache), and the equal-cache baselines: ``streamingllm`` / ``knorm`` at the
anchor reading's peak over the whole sequence (answer tokens included), ``streamingllm_q`` with, token
by token, the keys the anchor reading attends (:func:`anllm.eval.budgets.query_budgets`; a model
without anchors gets the budgets of its sentence ends and skips the anchor methods); and the kvpress
presses (``snapkv``, ``tova``, ``observed_attention``, ``expected_attention``, ``pyramidkv``,
``streamingllm_press``, ``knorm_press``, ...): the context up to the cue's last token is read with full
attention and its cache compressed once to what the anchor cache holds when the first answer token is
predicted (the keys the cue's last token attends, minus itself); the cue's last token and the answer
are then read against it.

Rows: one per (task, method, length[, depth]) with accuracy, its binomial standard error, C⇓ (1 −
kept/seen keys when the first answer token is predicted), the baselines' budget, the mean keys per
query (``mean_kv``) and time; per-item predictions in ``predictions.jsonl``.

Prose: the held-out split of ``longrange.data`` (a training data config, as ``recall.data``), or by
default ``data_dir``'s presidential speeches.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..anchors import marking_of
from . import baselines, presses
from . import methods as registry
from .budgets import mean_keys_per_query, query_budgets, sentence_end_tokens
from .documents import held_out_prose
from .haystacks import (
    ADJECTIVES, DEFAULT_DEPTHS, DIGITS, LETTERS, NOUNS, TASKS, Item, build_items, context_text, needle_depth,
)
from .methods import ppl_method
from .readers import last_logits, press_logits

__all__ = [  # the item builders live in anllm.eval.haystacks, last_logits in anllm.eval.readers
    "ADJECTIVES", "DEFAULT_DEPTHS", "DEFAULT_LENGTHS", "DEFAULT_METHODS", "DIGITS", "LETTERS", "NOUNS", "SUITE",
    "TASKS", "Item", "build_items", "check", "context_text", "keys_at_answer", "last_logits", "longrange_rows",
    "needle_depth", "options", "run_task", "sequence_budgets", "settings", "teacher_forced",
]

DEFAULT_METHODS = registry.DEFAULTS["longrange"]
DEFAULT_LENGTHS = (1024, 2048, 4096)


def teacher_forced(
    model: Any, contexts: list[torch.Tensor], answers: list[torch.Tensor], method: str, budgets: list[Any],
    pad_id: int, num_sink_tokens: int = 4, position_mode: str = "true",
) -> list[torch.Tensor]:
    """Per row, the model's argmax at every answer position given the true prefix (context + the answer
    tokens before it), read in one forward over context + answer. The row is exact iff it equals the
    answer: then greedy decoding produces exactly the answer."""
    n = max(len(a) for a in answers) + 1
    if registry.press_of(method) is not None:  # budgets: the anchor cache when the 1st answer token is predicted
        feeds = [torch.cat([c[-1:], a]) for c, a in zip(contexts, answers)]
        logits, _ = press_logits(model, [c[:-1] for c in contexts], feeds, method, [int(b) - 1 for b in budgets],
                                 pad_id, n, num_sink_tokens)
    else:
        seqs = [torch.cat([c, a]) for c, a in zip(contexts, answers)]
        logits = last_logits(model, seqs, method, budgets, pad_id, n, num_sink_tokens, position_mode)
    return [logits[j, n - len(a) - 1 : n - 1].argmax(-1).cpu() for j, a in enumerate(answers)]


def sequence_budgets(model: Any, tokenizer: Any, context: str, ctx_ids: torch.Tensor, answer_ids: torch.Tensor,
                     hide_anchors: bool = False) -> torch.Tensor:
    """``[C + A]``: keys each token of context + answer attends under the anchor reading
    (:func:`query_budgets`; a model without anchors: the sentence ends of the context's complete
    sentences play the anchors, the open cue and the answer have none)."""
    ids = torch.cat([ctx_ids, answer_ids])
    att = getattr(model, "_anllm_attention", None)
    if att is not None and att.cfg.enabled:
        return query_budgets(model, tokenizer, context, ids, hide_anchors)
    from ..masks import AnsanOptions

    ends = sentence_end_tokens(tokenizer, context, len(ctx_ids)).clone()
    ends[len(ctx_ids) - 1 :] = False  # the splitter closes the text's last span there, but the cue is open
    is_anchor = torch.cat([ends, torch.zeros(len(ids) - len(ends), dtype=torch.bool)])
    return baselines.ansan_keys_per_query(is_anchor, AnsanOptions(hide_anchors=hide_anchors))


def keys_at_answer(method: str, context_len: int, peak: int, per_query: torch.Tensor,
                   sentence: torch.Tensor | None) -> int:
    """Keys the query that predicts the first answer token (the cue's last token) attends: the cache
    the answer is read from (``anchor``: what the lossless anchor cache holds there)."""
    q = context_len - 1
    if method in ("full", "ansan"):
        return context_len
    if method in ("anchor", baselines.PER_QUERY) or registry.press_of(method) is not None:
        return int(per_query[q])
    if method == "sentence":
        assert sentence is not None
        return int(sentence[q])
    return min(int(peak), context_len)


def longrange_rows(
    model: Any, tokenizer: Any, anchor: dict[str, Any] | None, items: Sequence[Item], methods: Sequence[str], *,
    num_sink_tokens: int = 4, batch_size: int = 4, out_dir: Path | None = None, progress: bool = True,
    position_mode: str = "true",
) -> list[dict[str, Any]]:
    """Exact-match accuracy per (task, method, length[, depth]); per-item predictions in
    ``out_dir/predictions.jsonl``. Items of a cell are read in left-padded batches of ``batch_size``,
    shortest first (similar lengths, little padding)."""
    from tqdm.auto import tqdm

    marking = marking_of(anchor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if any(registry.press_of(m) for m in methods):
        presses.load_kvpress()  # imported before the timed reads
    enc = []
    for item in items:
        text = context_text(item, marking)
        ctx = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        ans = torch.tensor(tokenizer.encode(" " + item.answer, add_special_tokens=False), dtype=torch.long)
        per_query = sequence_budgets(model, tokenizer, text, ctx, ans)
        sentence = (sequence_budgets(model, tokenizer, text, ctx, ans, hide_anchors=True)
                    if "sentence" in methods else None)
        enc.append((ctx, ans, per_query, sentence, int(per_query.max())))
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(len(c) + len(a) for c, a, *_ in enc)
    if limit is not None and longest > int(limit):
        raise ValueError(f"longrange.lengths: a sequence of {longest} tokens exceeds the model's "
                         f"max_position_embeddings={limit}; lower longrange.lengths.")
    cells: dict[tuple[str, int, float | None], list[int]] = {}
    for i, item in enumerate(items):
        cells.setdefault((item.task, item.length, item.depth if item.task == "passkey" else None), []).append(i)
    batches = []
    for key, idx in cells.items():
        idx = sorted(idx, key=lambda i: len(enc[i][0]) + len(enc[i][1]))
        batches += [(key, idx[s : s + batch_size]) for s in range(0, len(idx), batch_size)]
    stats = {(m, key): {"correct": 0, "kept": 0, "seen": 0, "budget": 0, "mean_kv": 0.0, "tokens": 0, "time": 0.0}
             for m in methods for key in cells}
    preds: dict[int, dict[str, Any]] = {}
    for i, item in enumerate(items):
        preds[i] = {"task": item.task, "length": item.length,
                    "depth": None if item.depth is None else round(item.depth, 4), "item": item.index,
                    "answer": item.answer, "tokens": len(enc[i][0]), "answer_tokens": len(enc[i][1]),
                    "budget": enc[i][4], "needle_depth": round(needle_depth(item, tokenizer), 4)}
    for key, rows_ in tqdm(batches, desc="longrange", disable=not progress, leave=False):
        contexts = [enc[i][0] for i in rows_]
        answers = [enc[i][1] for i in rows_]
        for m in methods:
            press = registry.press_of(m) is not None
            # presses: the anchor cache at the answer; streamingllm_q: keys per query; else the peak
            given = [int(enc[i][2][len(enc[i][0]) - 1]) if press else enc[i][2] if m == baselines.PER_QUERY
                     else enc[i][4] for i in rows_]
            t0 = time.perf_counter()
            got = teacher_forced(model, contexts, answers, m, given, pad_id, num_sink_tokens, position_mode)
            s = stats[(m, key)]
            s["time"] += time.perf_counter() - t0
            for j, i in enumerate(rows_):
                ctx, ans, per_query, sentence, peak = enc[i]
                ok = bool(torch.equal(got[j], ans))
                s["correct"] += int(ok)
                s["kept"] += keys_at_answer(m, len(ctx), peak, per_query, sentence)
                s["seen"] += len(ctx)
                s["budget"] += given[j] if press else peak
                s["tokens"] += len(ctx)
                s["mean_kv"] += mean_keys_per_query(m, len(ctx) + len(ans), peak, per_query, sentence, len(ctx))
                preds[i].update({m: tokenizer.decode(got[j].tolist()), f"{m}_ok": ok})
    rows = []
    for m in methods:
        for key, idx in cells.items():
            task, length, depth = key
            s, n = stats[(m, key)], len(idx)
            p = s["correct"] / n
            row = {"suite": "longrange", "task": task, "method": m, "length": length}
            if task == "passkey":
                row["depth"] = depth
            row.update({"n": n, "acc": p, "se": math.sqrt(p * (1 - p) / n), "c_red": 1 - s["kept"] / s["seen"],
                        "budget": round(s["budget"] / n, 1), "mean_kv": s["mean_kv"] / n, "tokens": s["tokens"] / n,
                        "kv_kept": s["kept"], "kv_total": s["seen"], "time_s": s["time"]})
            rows.append(row)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        order = sorted(preds, key=lambda i: (items[i].task, items[i].length, items[i].depth or 0.0, items[i].index))
        with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
            for i in order:
                f.write(json.dumps(preds[i]) + "\n")
    return rows


# ---- the suite -------------------------------------------------------------------------------------


def options(cfg: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    defaults = {"data": None, "data_base_dir": None, "num_items": 20, "lengths": list(DEFAULT_LENGTHS),
                "depths": list(DEFAULT_DEPTHS), "num_keys": 4, "hops": 2, "seed": 0, "methods": None,
                "num_sink_tokens": 4, "batch_size": 4}
    section = cfg.get("longrange") or {}
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    return {**defaults, **{k: v for k, v in section.items() if v is not None}}


def _ints(opts: dict[str, Any], key: str, low: int, what: str) -> list[int]:
    value = opts[key]
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        out = [int(v) for v in values]
        if any(isinstance(v, bool) or float(v) != int(v) for v in values):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"longrange.{key} must be {what}, got {value!r}.") from None
    if not out or any(v < low for v in out):
        raise ValueError(f"longrange.{key} must be {what}, got {value!r}.")
    return out


def settings(cfg: Any) -> dict[str, Any]:
    """The validated ``longrange.*`` options (ValueError naming the key)."""
    opts = options(cfg)
    for m in opts["methods"] or []:
        try:
            ppl_method(m, "longrange")
        except ValueError as e:
            raise ValueError(f"longrange.methods: {e}") from None
    out = dict(opts)
    out["lengths"] = sorted(set(_ints(opts, "lengths", 64, "a non-empty list of token counts >= 64")))
    for key, low, what in (("num_items", 1, "an integer >= 1"), ("num_keys", 1, "an integer >= 1"),
                           ("hops", 1, "an integer >= 1"), ("num_sink_tokens", 0, "an integer >= 0"),
                           ("batch_size", 1, "an integer >= 1"), ("seed", -(2**63), "an integer")):
        if isinstance(opts[key], (list, tuple)):
            raise ValueError(f"longrange.{key} must be {what}, got {opts[key]!r}.")
        out[key] = _ints(opts, key, low, what)[0]
    depths = opts["depths"] if isinstance(opts["depths"], (list, tuple)) else [opts["depths"]]
    bad = f"longrange.depths must be a non-empty list of numbers in [0, 1], got {opts['depths']!r}."
    try:
        out["depths"] = sorted({float(d) for d in depths if not isinstance(d, bool)})
    except (TypeError, ValueError):
        raise ValueError(bad) from None
    if not out["depths"] or any(not 0 <= d <= 1 for d in out["depths"]):
        raise ValueError(bad)
    if out["num_keys"] > len(ADJECTIVES) * len(NOUNS):
        raise ValueError(f"longrange.num_keys must be at most {len(ADJECTIVES) * len(NOUNS)}, got {out['num_keys']}.")
    if opts["data"] is not None and not isinstance(opts["data"], dict):
        raise ValueError("longrange.data must be a training data config ({kind: jsonl, paths: [...], ...}) or null.")
    return out


def check(cfg: Any) -> None:
    settings(cfg)
    if options(cfg)["data"] is None and not cfg.get("data_dir"):
        raise FileNotFoundError("The longrange suite reads held-out prose: pass longrange.data=<data config> or "
                                "data_dir=../shared/data.")


def run_task(bundle: Any, cfg: Any, task: str, out_dir: Path) -> list[dict[str, Any]]:
    opts = settings(cfg)
    methods = registry.suite_methods("longrange", opts["methods"], bundle.model, bundle.notes)
    if not methods:
        raise ValueError("longrange.methods: nothing left to run on a model without anchor settings.")
    items = build_items(task, held_out_prose(cfg, "longrange", "The longrange suite"), bundle.tokenizer, lengths=opts["lengths"], depths=opts["depths"],
                        num_items=opts["num_items"], num_keys=opts["num_keys"], hops=opts["hops"], seed=opts["seed"])
    return longrange_rows(bundle.model, bundle.tokenizer, bundle.anchor, items, methods,
                          num_sink_tokens=opts["num_sink_tokens"], batch_size=opts["batch_size"], out_dir=out_dir,
                          progress=bool(cfg.get("progress", True)),
                          position_mode=str(cfg.get("position_mode") or "true"))


def _make_suite() -> Any:
    from .suites import Suite

    return Suite(name="longrange", tasks=TASKS, default_tasks=TASKS, run_task=run_task, check=check,
                 describe="Long-range retrieval (passkey, multi-key needle, variable tracking): teacher-forced exact "
                          "match, full vs anchor vs equal-cache baselines")


SUITE = _make_suite()
