"""Long-range recall probe: does a fact survive k sentences of distance when the cache is bounded?

An item is held-out prose, then a fact sentence binding a name to a value ("Maria's favourite colour
is green."), then ``k`` filler sentences of held-out prose, then the cue "Maria's favourite colour
is". The model must put the right value first among ``num_choices`` values of the same category
(likelihood of the value's first token; an item's values start with different tokens). Items are built once per seed; the same item is
read at every distance k, so accuracy vs k isolates distance.

Methods (names as in the perplexity suite): ``full`` (causal, everything cached), ``anchor`` (AnSAN +
AnchorCache: the fact sentence is gone once its anchor is cached; only the anchor can carry the
fact), ``sentence`` (control: no earlier anchors either), and the equal-cache baselines
``streamingllm`` / ``knorm`` where every token attends at most the anchor cache's peak for that
item, and ``streamingllm_q`` where every token attends as many keys as it does in the anchor reading
(see :mod:`anllm.eval.baselines`). A window loses the fact once the fillers exceed it; anchors
keep it only if training taught them to carry it. The kvpress presses (``snapkv``, ``tova``,
``observed_attention``, ``expected_attention``, ``pyramidkv``, ``streamingllm_press``, ``knorm_press``,
...) read the item up to the cue's last token with full attention and compress that cache once to
what the anchor cache holds when the value is predicted (the keys the cue's last token attends under
the anchor reading, minus that token itself), then read the cue's last token against it: the
field's methods, which see the whole text before choosing, at the anchor cache's size.

Prose comes from the held-out split of ``recall.data`` (a training data config, as ``ppl.data``), or
by default from ``data_dir``'s presidential speeches, which the study's data config holds out whole.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from ..anchors import Marking, marking_of
from . import baselines, presses
from . import methods as registry
from .baselines import streaming_batch_mask
from .budgets import query_budgets
from .documents import SPEECHES, held_out_prose, prose_sentences
from .methods import ppl_method
from .readers import next_token_logits

__all__ = [  # streaming_batch_mask, prose_sentences, SPEECHES and next_token_logits moved; still importable here
    "CATEGORIES", "DEFAULT_DISTANCES", "DEFAULT_METHODS", "NAMES", "SPEECHES", "SUITE", "Item", "build_items",
    "check", "context_text", "next_token_logits", "options", "prose_sentences", "recall_rows", "run_task",
    "streaming_batch_mask",
]

CATEGORIES: dict[str, list[str]] = {
    "favourite colour": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"],
    "home city": ["Paris", "London", "Tokyo", "Berlin", "Rome", "Madrid", "Cairo", "Moscow", "Sydney", "Chicago"],
    "pet": ["dog", "cat", "horse", "rabbit", "parrot", "turtle", "goat", "snake", "mouse", "fish"],
    "favourite fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"],
}
NAMES = ["Maria", "James", "Aisha", "Peter", "Sofia", "Daniel", "Elena", "Samuel", "Clara", "Victor", "Nadia",
         "Oliver", "Hannah", "Lucas", "Irene", "Martin", "Grace", "Felix", "Laura", "Hugo", "Alice", "Thomas",
         "Emma", "Robert", "Julia", "Simon", "Anna", "George", "Helen", "Oscar"]
DEFAULT_METHODS = registry.DEFAULTS["recall"]
DEFAULT_DISTANCES = (0, 2, 5, 10, 20)


@dataclass(frozen=True)
class Item:
    """One fact to recall: prose before it, the fact, fillers (the first k are used), the cue, choices."""

    name: str
    category: str
    answer: int  # index into choices
    choices: tuple[str, ...]
    before: tuple[str, ...]
    fillers: tuple[str, ...]

    @property
    def fact(self) -> str:
        return f"{self.cue} {self.choices[self.answer]}."

    @property
    def cue(self) -> str:
        return f"{self.name}'s {self.category} is"

    def context_sentences(self, k: int) -> list[str]:
        """Complete sentences before the cue, at distance ``k``."""
        return [*self.before, self.fact, *self.fillers[:k]]


def build_items(
    docs: Sequence[tuple[str, str]], tokenizer: Any, *, num_items: int, max_distance: int, num_choices: int = 4,
    num_before: int = 3, seed: int = 0,
) -> list[Item]:
    """``num_items`` items from held-out ``docs``; each needs ``num_before + max_distance`` consecutive
    prose sentences. The choices of an item start with different tokens (the first token is scored;
    with a real vocabulary every value is one token anyway)."""
    first = {v: tokenizer.encode(" " + v, add_special_tokens=False)[0] for vals in CATEGORIES.values() for v in vals}
    by_first = {cat: {first[v]: v for v in reversed(vals)} for cat, vals in CATEGORIES.items()}
    usable = {cat: sorted(vs.values()) for cat, vs in by_first.items() if len(vs) >= num_choices}
    if not usable:
        raise ValueError(f"No recall category has {num_choices} values with different first tokens for this "
                         "tokenizer; lower recall.num_choices.")
    need = num_before + max_distance
    runs = [r for r in prose_sentences(docs) if len(r) >= need]
    if not runs:
        raise ValueError(f"No held-out document has {need} consecutive prose sentences (recall.distances too long?).")
    rng = random.Random(seed)
    items = []
    for _ in range(num_items):
        run = rng.choice(runs)
        start = rng.randrange(len(run) - need + 1)
        cat = rng.choice(sorted(usable))
        choices = tuple(rng.sample(usable[cat], num_choices))
        items.append(Item(name=rng.choice(NAMES), category=cat, answer=rng.randrange(num_choices), choices=choices,
                          before=tuple(run[start : start + num_before]),
                          fillers=tuple(run[start + num_before : start + need])))
    return items


def context_text(item: Item, k: int, marking: Marking | str | None) -> str:
    """The text the model reads: complete sentences, then the open cue. AC models get ``<AC>`` after
    every complete sentence, marked as in training (``marking``), never after the unfinished cue."""
    body = " ".join(item.context_sentences(k))
    if isinstance(marking, str):
        marking = Marking(marking)
    if marking is not None:
        body = replace(marking, after_last=True).apply(body)  # the cue, not the fillers, is the open sentence
    return f"{body} {item.cue}"


def recall_rows(
    model: Any, tokenizer: Any, anchor: dict[str, Any] | None, items: Sequence[Item], methods: Sequence[str],
    distances: Sequence[int], *, num_sink_tokens: int = 4, batch_size: int = 8, out_dir: Path | None = None,
    progress: bool = True, position_mode: str = "true",
) -> list[dict[str, Any]]:
    """Accuracy per method and distance; per-item predictions in ``out_dir/predictions.jsonl``.

    Items are read in left-padded batches of ``batch_size`` (a CPU forward costs a full pass over the
    weights however short it is, so batching is most of the speed)."""
    from tqdm.auto import tqdm

    marking = marking_of(anchor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if any(registry.press_of(m) for m in methods):
        presses.load_kvpress()  # imported before the timed reads
    distances = sorted(distances)
    texts = {(i, k): context_text(item, k, marking) for i, item in enumerate(items) for k in distances}
    ids = {key: torch.tensor(tokenizer(t)["input_ids"]) for key, t in texts.items()}
    per_query = {key: query_budgets(model, tokenizer, texts[key], ids[key]) for key in texts}
    budgets_of = {key: int(b.max()) for key, b in per_query.items()}
    choice_ids = [[tokenizer.encode(" " + c, add_special_tokens=False)[0] for c in item.choices] for item in items]
    stats = {(m, k): {"correct": 0, "kept": 0, "seen": 0, "budget": 0, "time": 0.0} for m in methods for k in distances}
    preds = {(i, k): {"item": i, "distance": k, "answer": item.choices[item.answer]}
             for i, item in enumerate(items) for k in distances}
    batches = [(k, list(range(i, min(i + batch_size, len(items))))) for k in distances
               for i in range(0, len(items), batch_size)]
    for k, rows_ in tqdm(batches, desc="recall", disable=not progress, leave=False):
        seqs = [ids[(i, k)] for i in rows_]
        budgets = [budgets_of[(i, k)] for i in rows_]
        for m in methods:
            t0 = time.perf_counter()
            if registry.press_of(m) is not None:  # the anchor cache when the value is predicted
                given = [int(per_query[(i, k)][-1]) for i in rows_]
            elif m == baselines.PER_QUERY:
                given = [per_query[(i, k)] for i in rows_]
            else:
                given = budgets
            logits, kept = next_token_logits(model, seqs, m, given, pad_id, num_sink_tokens, position_mode)
            s = stats[(m, k)]
            s["time"] += time.perf_counter() - t0
            for j, i in enumerate(rows_):
                pick = int(logits[j].float()[choice_ids[i]].argmax())
                s["correct"] += int(pick == items[i].answer)
                s["kept"] += kept[j]
                s["seen"] += len(seqs[j])
                s["budget"] += given[j] if registry.press_of(m) is not None else budgets[j]
                preds[(i, k)].update({m: items[i].choices[pick], "tokens": len(seqs[j]), "budget": budgets[j]})
    n = len(items)
    rows = []
    for m in methods:
        for k in distances:
            s = stats[(m, k)]
            rows.append({"suite": "recall", "task": "recall", "method": m, "distance": k, "n": n,
                         "acc": s["correct"] / n, "c_red": 1 - s["kept"] / s["seen"], "budget": round(s["budget"] / n, 1),
                         "kv_kept": s["kept"], "kv_total": s["seen"], "time_s": s["time"]})
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
            for key in sorted(preds):
                f.write(json.dumps(preds[key]) + "\n")
    return rows


# ---- the suite ----------------------------------------------------------------------------------


def options(cfg: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    defaults = {"data": None, "data_base_dir": None, "num_items": 100, "distances": list(DEFAULT_DISTANCES),
                "num_choices": 4, "num_before": 3, "seed": 0, "methods": None, "num_sink_tokens": 4, "batch_size": 8}
    section = cfg.get("recall") or {}
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    return {**defaults, **{k: v for k, v in section.items() if v is not None}}


def check(cfg: Any) -> None:
    opts = options(cfg)
    for m in opts["methods"] or []:
        ppl_method(m, "recall")
    if int(opts["num_items"]) < 1 or int(opts["num_choices"]) < 2:
        raise ValueError("recall.num_items must be >= 1 and recall.num_choices >= 2.")
    if any(int(k) < 0 for k in opts["distances"]):
        raise ValueError(f"recall.distances must be >= 0, got {opts['distances']}.")
    if opts["data"] is None and not cfg.get("data_dir"):
        raise FileNotFoundError("The recall probe reads held-out prose: pass recall.data=<data config> or "
                                "data_dir=../shared/data.")


def run_task(bundle: Any, cfg: Any, task: str, out_dir: Path) -> list[dict[str, Any]]:
    opts = options(cfg)
    methods = registry.suite_methods("recall", opts["methods"], bundle.model, bundle.notes)
    distances = sorted({int(k) for k in opts["distances"]})
    items = build_items(held_out_prose(cfg, "recall", "The recall probe"), bundle.tokenizer, num_items=int(opts["num_items"]),
                        max_distance=max(distances), num_choices=int(opts["num_choices"]),
                        num_before=int(opts["num_before"]), seed=int(opts["seed"]))
    return recall_rows(bundle.model, bundle.tokenizer, bundle.anchor, items, methods, distances,
                       num_sink_tokens=int(opts["num_sink_tokens"]), batch_size=int(opts["batch_size"]), out_dir=out_dir,
                       progress=bool(cfg.get("progress", True)), position_mode=str(cfg.get("position_mode") or "true"))


def _make_suite() -> Any:
    from .suites import Suite

    return Suite(name="recall", tasks=("recall",), default_tasks=("recall",), run_task=run_task, check=check,
                 describe="Long-range recall: a fact k sentences back, full vs anchor vs equal-cache baselines")


SUITE = _make_suite()
