"""Long-range retrieval suite: tasks a local window cannot fake (passkey, multi-key needle, variable tracking).

Every item is a haystack of held-out prose (complete sentences, consecutive in their documents) of
about ``N`` tokens with "needle" sentences inserted, then a question and an open cue; the model must
produce the answer (a number) right after the cue:

* ``passkey``: "The pass key is 48213. Remember it. 48213 is the pass key." at relative depth ``d``
  (``longrange.depths``: the fraction of the haystack's prose tokens before the needle, as in the
  needle-in-a-haystack test; 1 = right before the question); question and cue "What is the pass key?
  The pass key is". The same haystack and key are read at every depth, so accuracy vs depth
  isolates the position.
* ``multikey`` (RULER's multi-key needle): ``longrange.num_keys`` needles "The special magic number
  for {key} is {number}." at random depths; one of them is asked for.
* ``vartrack`` (RULER's variable tracking): "VAR A = {number}." ... "VAR B = VAR A." ... (``hops``
  assignments after the first, in order, at random depths); cue "VAR {last} holds the value".

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
by token, the keys the anchor reading attends (:func:`anllm.eval.perplexity.query_budgets`; a model
without anchors gets the budgets of its sentence ends and skips the anchor methods).

Rows: one per (task, method, length[, depth]) with accuracy, its binomial standard error, C⇓ (1 −
kept/seen keys when the first answer token is predicted), the baselines' budget, the mean keys per
query (``mean_kv``) and time; per-item predictions in ``predictions.jsonl``.

N counts the tokens of the plain text (so every model reads the same haystacks); an AC model also
reads one ``<AC>`` per sentence. Prose: the held-out split of ``longrange.data`` (a training data
config, as ``recall.data``), or by default ``data_dir``'s presidential speeches.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from ..anchors import Marking, marking_of
from ..modeling import anchor_options, is_anchor_aware
from . import baselines
from .perplexity import mean_keys_per_query, ppl_method, query_budgets, runnable_methods, sentence_end_tokens
from .recall import SPEECHES, _left_pad, prose_sentences, streaming_batch_mask

TASKS = ("passkey", "multikey", "vartrack")
DEFAULT_METHODS = ("full", "anchor", "streamingllm", "streamingllm_q")
DEFAULT_LENGTHS = (1024, 2048, 4096)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DIGITS = {"passkey": 5, "multikey": 7, "vartrack": 5}  # digits of the answer number (RULER: 7 for needles)
ADJECTIVES = ["amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "mellow", "nimble", "odd", "proud", "quiet", "rusty", "silent", "tidy"]
NOUNS = ["anchor", "badger", "candle", "desert", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river", "saddle", "tunnel"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Item:
    """One question: complete sentences (haystack with the needles in it), a question, an open cue."""

    task: str
    length: int  # N: the target token count of the plain context
    depth: float | None  # fraction of the prose before the (asked) needle: passkey's requested depth, else drawn
    index: int  # item number within its (task, length[, depth]) cell
    sentences: tuple[str, ...]
    needles: tuple[int, ...]  # indices into ``sentences`` of the inserted sentences (the asked one first)
    question: str  # a complete sentence after the haystack ("" for none)
    cue: str  # the open sentence the answer continues
    answer: str  # the value, read as " " + answer

    @property
    def haystack(self) -> list[str]:
        return [s for i, s in enumerate(self.sentences) if i not in self.needles]


def context_text(item: Item, marking: Marking | str | None) -> str:
    """The text before the answer: complete sentences (AC models: ``<AC>`` after each, as in training),
    then the open cue (no anchor after it, so the answer stays in the open sentence)."""
    body = " ".join([*item.sentences, *([item.question] if item.question else [])])
    if isinstance(marking, str):
        marking = Marking(marking)
    if marking is not None:
        body = replace(marking, after_last=True).apply(body)
    return f"{body} {item.cue}"


# ---- items -----------------------------------------------------------------------------------------


def _number(rng: random.Random, digits: int, taken: set[str], haystack: str) -> str:
    while True:
        n = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if n not in taken and n not in haystack and not any(n in t or t in n for t in taken):
            return n


def _name(rng: random.Random, taken: set[str], haystack: str) -> str:
    while True:
        n = "".join(rng.choice(LETTERS) for _ in range(5))
        if n not in taken and n not in haystack:
            return n


class _Pool:
    """Held-out prose sentences in reading order with their token counts (tokenised once)."""

    def __init__(self, docs: Sequence[tuple[str, str]], tokenizer: Any):
        self.sentences = [s for run in prose_sentences(docs) for s in run]
        if not self.sentences:
            raise ValueError("The held-out documents have no ordinary prose sentences (longrange.data).")
        ids = tokenizer([" " + s for s in self.sentences], add_special_tokens=False)["input_ids"]
        self.counts = [len(x) for x in ids]
        self.suffix = [0] * (len(self.counts) + 1)
        for i in range(len(self.counts) - 1, -1, -1):
            self.suffix[i] = self.suffix[i + 1] + self.counts[i]

    def starts(self, tokens: int) -> int:
        """How many start sentences leave at least ``tokens`` tokens of prose after them."""
        n = sum(1 for i in range(len(self.counts)) if self.suffix[i] >= tokens)
        if n == 0:
            raise ValueError(f"The held-out prose has only {self.suffix[0]} tokens; longrange.lengths needs "
                             f"{tokens}. Use shorter lengths or more held-out data (longrange.data).")
        return n


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _place(haystack: list[str], counts: list[int], needles: list[tuple[float, str]]) -> tuple[list[str], list[int]]:
    """Insert each ``(depth, sentence)`` at the sentence boundary with the fraction ``depth`` of the
    haystack's tokens before it (nearest; 0: before all prose, 1: after it, right before the question);
    returns the sentences and the needles' indices (in the order given)."""
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)
    at = [min(range(len(prefix)), key=lambda b: (abs(prefix[b] - d * prefix[-1]), b)) for d, _ in needles]
    out: list[str] = []
    where = [0] * len(needles)
    order = sorted(range(len(needles)), key=lambda j: (at[j], j))
    k = 0
    for b in range(len(haystack) + 1):
        while k < len(order) and at[order[k]] == b:
            where[order[k]] = len(out)
            out.append(needles[order[k]][1])
            k += 1
        if b < len(haystack):
            out.append(haystack[b])
    return out, where


def _fit(tokenizer: Any, pool: _Pool, start: int, N: int, fixed: int, build: Any) -> Item:
    """Fill the haystack from ``pool`` at ``start`` until the context reaches N tokens (estimated from
    per-sentence counts, then trimmed to the exact count); ``build(haystack, counts)`` makes the item."""
    haystack, counts, total = [], [], fixed
    i = start
    while i < len(pool.sentences) and total + pool.counts[i] <= N:
        haystack.append(pool.sentences[i])
        counts.append(pool.counts[i])
        total += pool.counts[i]
        i += 1
    while True:
        item = build(haystack, counts)
        if _count(tokenizer, context_text(item, None)) <= N:
            return item
        if not haystack:
            raise ValueError(f"longrange.lengths: {N} tokens cannot hold the {item.task} needles and question.")
        haystack, counts = haystack[:-1], counts[:-1]


def build_items(
    task: str, docs: Sequence[tuple[str, str]], tokenizer: Any, *, lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS, num_items: int = 20, num_keys: int = 4, hops: int = 2, seed: int = 0,
    pool: _Pool | None = None,
) -> list[Item]:
    """The items of ``task``: ``num_items`` per length (and, for passkey, per depth: the same haystack and
    key at every depth). Deterministic: item ``i`` of length ``N`` draws from its own
    ``random.Random`` seeded by (task, seed, N, i), so changing the lists never changes an item."""
    if task not in TASKS:
        raise ValueError(f"Unknown longrange task {task!r}: choose one of {TASKS}.")
    pool = pool or _Pool(docs, tokenizer)
    lead = _count(tokenizer, "")  # tokens the tokenizer adds in front (BOS)
    items: list[Item] = []
    for N in lengths:
        n_starts = pool.starts(N)
        for i in range(num_items):
            rng = random.Random(f"longrange:{task}:{seed}:{N}:{i}")
            start = rng.randrange(n_starts)
            # The values must not occur in the prose this item can read (at most N tokens from start).
            end, seen = start, 0
            while end < len(pool.sentences) and seen <= N:
                seen += pool.counts[end]
                end += 1
            prose = " ".join(pool.sentences[start:end])
            # variants: ([(depth, needle sentence)], the item's depth); the asked needle first
            if task == "passkey":
                answer = _number(rng, DIGITS[task], set(), prose)
                needle = f"The pass key is {answer}. Remember it. {answer} is the pass key."
                question, cue = "What is the pass key?", "The pass key is"
                variants = [([(float(d), needle)], float(d)) for d in depths]
            elif task == "multikey":
                keys = rng.sample([k for k in (f"{a}-{b}" for a in ADJECTIVES for b in NOUNS) if k not in prose],
                                  num_keys)
                values: list[str] = []
                for _ in keys:
                    values.append(_number(rng, DIGITS[task], set(values), prose))
                depth_of = [rng.random() for _ in keys]
                ask = rng.randrange(num_keys)
                order = [ask] + [k for k in range(num_keys) if k != ask]
                question = f"What is the special magic number for {keys[ask]}?"
                cue = f"The special magic number for {keys[ask]} is"
                answer = values[ask]
                needles = [f"The special magic number for {k} is {v}." for k, v in zip(keys, values)]
                variants = [([(depth_of[k], needles[k]) for k in order], depth_of[ask])]
            else:  # vartrack: the chain in reading order
                chain: list[str] = []
                for _ in range(hops + 1):
                    chain.append(_name(rng, set(chain), prose))
                answer = _number(rng, DIGITS[task], set(), prose)
                statements = [f"VAR {chain[0]} = {answer}."]
                statements += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
                depth_of = sorted(rng.random() for _ in statements)
                question, cue = "", f"VAR {chain[-1]} holds the value"
                variants = [(list(zip(depth_of, statements)), depth_of[0])]
            fixed = lead + sum(_count_plain(tokenizer, s) for s in [*(s for _, s in variants[0][0]), question, cue])
            for placed, depth in variants:
                def build(h: list[str], c: list[int], placed: list[tuple[float, str]] = placed,
                          depth: float = depth) -> Item:
                    sents, where = _place(h, c, placed)
                    return Item(task, int(N), depth, i, tuple(sents), tuple(where), question, cue, answer)

                items.append(_fit(tokenizer, pool, start, int(N), fixed, build))
    return items


def _count_plain(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(" " + text, add_special_tokens=False)) if text else 0


def needle_depth(item: Item, tokenizer: Any) -> float:
    """Where the asked needle starts, as a fraction of the plain context's tokens (slightly below
    ``item.depth``, which counts the prose only: the needles, question and cue come on top)."""
    text = context_text(item, None)
    before = text[: text.index(item.sentences[item.needles[0]])].rstrip()
    return _count(tokenizer, before) / _count(tokenizer, text)


# ---- scoring ---------------------------------------------------------------------------------------


@torch.no_grad()
def last_logits(
    model: Any, seqs: list[torch.Tensor], method: str, budgets: list[Any], pad_id: int, n: int,
    num_sink_tokens: int = 4, position_mode: str = "true",
) -> torch.Tensor:
    """``[B, n, V]``: the logits at each sequence's last ``n`` positions under ``method``, one
    left-padded forward (:func:`anllm.eval.recall.next_token_logits` for ``n`` tokens; K-norm: one forward
    per sequence). ``budgets``: per row, the peak (``streamingllm``/``knorm``) or ``[L]`` keys per query
    (``streamingllm_q``); ignored by the other methods."""
    from ..cache import AnchorCache
    from .generation import method_attention

    if method == "knorm":
        return torch.stack([baselines.baseline_logits(model, x, method, b, num_sink_tokens)[-n:]
                            for x, b in zip(seqs, budgets)])
    device = next(model.parameters()).device
    ids, mask = _left_pad(seqs, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    kw = dict(input_ids=ids, position_ids=pos, logits_to_keep=n)
    if method in ("streamingllm", baselines.PER_QUERY):
        am = streaming_batch_mask([len(x) for x in seqs], ids.shape[1], budgets, num_sink_tokens).to(device)
        with method_attention(model, "full") if is_anchor_aware(model) else contextlib.nullcontext():
            return model(attention_mask=am, use_cache=False, **kw).logits[:, -n:]
    if method == "full":
        with method_attention(model, "full") if is_anchor_aware(model) else contextlib.nullcontext():
            return model(attention_mask=mask, use_cache=False, **kw).logits[:, -n:]
    if method == "ansan":
        with method_attention(model, "ansan"):
            return model(attention_mask=mask, use_cache=False, **kw).logits[:, -n:]
    cache = AnchorCache(position_mode=position_mode)  # type: ignore[arg-type]
    rule = anchor_options(model, hide_anchors=True) if method == "sentence" else contextlib.nullcontext()
    with method_attention(model, "anchor"), rule:
        return model(attention_mask=mask, past_key_values=cache, use_cache=True, **kw).logits[:, -n:]


def teacher_forced(
    model: Any, contexts: list[torch.Tensor], answers: list[torch.Tensor], method: str, budgets: list[Any],
    pad_id: int, num_sink_tokens: int = 4, position_mode: str = "true",
) -> list[torch.Tensor]:
    """Per row, the model's argmax at every answer position given the true prefix (context + the answer
    tokens before it), read in one forward over context + answer. The row is exact iff it equals the
    answer: then greedy decoding produces exactly the answer."""
    seqs = [torch.cat([c, a]) for c, a in zip(contexts, answers)]
    n = max(len(a) for a in answers) + 1
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
    if method in ("anchor", baselines.PER_QUERY):
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
            given = [enc[i][2] if m == baselines.PER_QUERY else enc[i][4] for i in rows_]
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
                s["budget"] += peak
                s["tokens"] += len(ctx)
                s["mean_kv"] += mean_keys_per_query(m, len(ctx) + len(ans), peak, per_query, sentence)
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


def held_out_prose(cfg: Any) -> list[tuple[str, str]]:
    """The documents the haystacks come from (as :func:`anllm.eval.recall.held_out_prose`, ``longrange.*``)."""
    from ..data.split import held_out_documents

    opts = options(cfg)
    data = opts["data"]
    if data is None:
        if not cfg.get("data_dir"):
            raise FileNotFoundError("The longrange suite reads held-out prose: pass longrange.data=<data config> or "
                                    "data_dir=../shared/data (its presidential speeches).")
        path = str(Path(str(cfg.get("data_dir"))).expanduser() / SPEECHES)
        data = {"kind": "jsonl", "paths": [path], "holdout_paths": [path]}
    return held_out_documents(data, opts["data_base_dir"])


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
            ppl_method(m)
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
    methods = [ppl_method(m) for m in (opts["methods"] or DEFAULT_METHODS)]
    methods, skipped = runnable_methods(methods, is_anchor_aware(bundle.model))
    if skipped:
        note = f"longrange: no anchor settings, so {', '.join(skipped)} was skipped."
        if note not in bundle.notes:
            bundle.notes.append(note)
    if not methods:
        raise ValueError("longrange.methods: nothing left to run on a model without anchor settings.")
    items = build_items(task, held_out_prose(cfg), bundle.tokenizer, lengths=opts["lengths"], depths=opts["depths"],
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
