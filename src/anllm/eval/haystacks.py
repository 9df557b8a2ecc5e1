"""The long-range items: needles in a haystack of held-out prose (passkey, multi-key needle, variable tracking).

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

N counts the tokens of the plain text (so every model reads the same haystacks); an AC model also
reads one ``<AC>`` per sentence (:func:`context_text`). The suite that scores them is
:mod:`anllm.eval.longrange`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Sequence

from ..anchors import Marking
from .documents import prose_sentences

TASKS = ("passkey", "multikey", "vartrack")
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
