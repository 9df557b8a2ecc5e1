"""The evaluation methods: one registry entry per name, read by every suite.

A *method* is a way of reading text with a model: which attention rule (``attention``), which KV
cache (``cache``), and, for the training-free baselines, how many keys a token may attend
(``budget``). The suites (``translation``, ``ppl``, ``recall``, ``longrange``, ``qa``) take their
method lists, aliases and the "needs an anchor-aware model" rule from here, so a new method is one
:class:`Method` entry in :data:`REGISTRY` (plus its reading code, if it reads in a new way).

* ``attention``: ``causal`` (the AnSAN rule switched off), ``ansan`` (the model's AnSAN rule) or
  ``sentence`` (the AnSAN rule with earlier anchors hidden: every token sees its own sentence);
* ``cache``: ``full`` (a ``DynamicCache``: every key kept), ``anchor`` (:class:`anllm.AnchorCache`),
  ``anchor+src`` (``AnchorCache(keep_prefix=True)``: the prompt stays cached) or ``None`` (the
  baselines read with a bounded mask, or compress a full cache, see :mod:`anllm.eval.baselines` and :mod:`anllm.eval.presses`);
* ``budget``: keys per token of an equal-cache baseline: ``peak`` (the anchor reading's peak, one
  number per sequence: equal peak memory), ``per-query`` (each token attends as many keys as under
  the AnSAN rule: equal attention cost) or ``kept`` (a kvpress press: the context's cache is
  compressed once to what the anchor cache holds at that point); ``compress_once``: in the QA suite
  the baseline compresses the prefilled context's full cache once, to the anchor cache's kept size;
* ``press``: the NVIDIA kvpress class that compresses (``kind="press"``: in every suite that lists
  it; ``streamingllm``/``knorm``: in QA only, their long-text readings stay this project's
  every-token-bounded ones), with fixed ``press_options``; ``eager``: the press reads the prefill's
  attention weights, so the prefill runs with eager attention. See :mod:`anllm.eval.presses`.

This module imports nothing from the suites (they all import it), and the model-side helpers
(:func:`new_cache`, :func:`attention`) import ``anllm.cache``/``anllm.modeling`` only when called.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

SUITES = ("translation", "ppl", "recall", "longrange", "qa")
READINGS = ("ppl", "recall", "longrange")  # the long-text readings, validated by ppl_method(name, suite)


@dataclass(frozen=True)
class Method:
    """One evaluation method (see the module doc for the fields' values)."""

    name: str
    kind: str  # "cache" | "mask" | "baseline" | "press" | "stock"
    needs_anchors: bool  # a model without anchor settings cannot be read this way (QA's compress-once
    # baselines also need the ``anchor`` mode beside them, for its kept size: MultiModeScorer checks that)
    attention: str  # "causal" | "ansan" | "sentence"
    cache: str | None  # "full" | "anchor" | "anchor+src" | None
    budget: str | None  # None | "peak" | "per-query"
    suites: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    compress_once: bool = False  # QA: compress the context cache once to the anchor cache's kept size
    describe: str = ""
    press: str | None = None  # kvpress class (e.g. "SnapKVPress") that compresses the context cache once
    press_options: tuple[tuple[str, Any], ...] = ()  # fixed constructor options of that class
    eager: bool = False  # the press scores from the prefill's attention weights (eager attention)


_ALL = SUITES
_READ = READINGS
_PRESSED = ("recall", "longrange", "qa")  # the suites where a cache is compressed after reading a context
REGISTRY: tuple[Method, ...] = (
    Method("full", "cache", False, "causal", "full", None, _ALL, ("causal",),
           describe="causal attention, every key cached (the reference)"),
    Method("ansan", "mask", True, "ansan", "full", None, ("translation", *_READ, "qa"),
           describe="the AnSAN mask with every key kept (the losslessness reference)"),
    Method("anchor", "cache", True, "ansan", "anchor", None, _ALL,
           describe="AnSAN + AnchorCache: only what the rule still needs is kept"),
    Method("anchor+src", "cache", True, "ansan", "anchor+src", None, ("translation",),
           ("ansan_src", "anchor_src", "src"),
           describe="AnSAN + AnchorCache that keeps the prompt/source (the paper's Src Cache row)"),
    Method("sentence", "cache", True, "sentence", "anchor", None, _READ,
           describe="sentence-only control: AnSAN with earlier anchors hidden"),
    Method("streamingllm", "baseline", False, "causal", None, "peak", (*_READ, "qa"), compress_once=True,
           press="StreamingLLMPress",
           describe="StreamingLLM (sinks + recent keys) at the anchor reading's peak; QA: compress-once (kvpress)"),
    Method("streamingllm_q", "baseline", False, "causal", None, "per-query", _READ,
           describe="StreamingLLM with, token by token, the keys the anchor reading attends"),
    Method("knorm", "baseline", False, "causal", None, "peak", (*_READ, "qa"), compress_once=True,
           press="KnormPress",
           describe="K-norm (lowest-norm keys per head) at the anchor reading's peak; QA: compress-once (kvpress)"),
    Method("stock", "stock", False, "causal", None, None, ("qa",),
           describe="lm-eval's stock per-request forward, context recomputed per choice (speed baseline)"),
    Method("streamingllm_stream", "baseline", True, "causal", None, "peak", ("qa",),
           describe="QA: StreamingLLM bounded from the start at the anchor reading's peak"),
    Method("streamingllm_stream_q", "baseline", True, "causal", None, "per-query", ("qa",),
           describe="QA: StreamingLLM bounded from the start with the AnSAN rule's keys per token"),
    # kvpress presses (NVIDIA kvpress 0.5), one entry each: the context's full cache compressed once, after
    # it is read, to the anchor cache's kept count at that point (QA: the context minus its last token;
    # recall, longrange: the text before the cue's last token). Never in ppl: a press reads its context
    # with full attention, so it has no every-token-bounded reading.
    *(Method(name, "press", False, "causal", None, "kept", _PRESSED, aliases, compress_once=True, press=cls,
             press_options=opts, eager=eager, describe=text)
      for name, cls, opts, eager, aliases, text in (
          ("streamingllm_press", "StreamingLLMPress", (), False, (),
           "kvpress StreamingLLM: sinks + most recent keys (in QA the same as streamingllm)"),
          ("knorm_press", "KnormPress", (), False, (),
           "kvpress K-norm: the lowest-norm keys per KV head (in QA the same as knorm)"),
          ("snapkv", "SnapKVPress", (), False, (),
           "kvpress SnapKV: keys the last window's queries attend most (window: 64, at most half the budget)"),
          ("tova", "TOVAPress", (), False, (),
           "kvpress TOVA: keys the last token attends most (head-averaged)"),
          ("observed_attention", "ObservedAttentionPress", (), True, ("h2o",),
           "kvpress ObservedAttention (H2O-style): keys with the most attention over the prefill (eager)"),
          ("expected_attention", "ExpectedAttentionPress", (), False, (),
           "kvpress Expected Attention: keys future queries are expected to attend (query statistics + RoPE)"),
          ("pyramidkv", "PyramidKVPress", (), False, (),
           "kvpress PyramidKV: SnapKV scores, more keys in lower layers where the budget allows (mean = budget)"),
          ("keydiff", "KeyDiffPress", (), False, (),
           "kvpress KeyDiff: keys least similar to the mean key direction"),
          ("lagkv", "LagKVPress", (), False, (),
           "kvpress LagKV: lag-relative key/value statistics per 128-token partition (shorter: sinks + recent)"),
          ("curkv", "CURPress", (), False, (),
           "kvpress CurDKV: key x value leverage scores (local windows of 16)"),
          ("leverage", "LeverageScorePress", (), False, (),
           "kvpress approximate key leverage scores (Gaussian sketch, seeded)"),
          ("compactor", "CompactorPress", (), False, (),
           "kvpress Compactor: leverage scores blended with non-causal chunked attention (seeded)"),
          ("capkv", "CapPress", (), False, (),
           "kvpress CAPKV: query-aligned value coverage"),
          ("noncausal_attention", "NonCausalAttnPress", (), False, (),
           "kvpress non-causal chunked attention (256-token chunks), summed over queries"),
          ("criticalkv", "CriticalKVPress", (("press", "SnapKVPress"),), False, (),
           "kvpress CriticalKV around SnapKV: half the budget by SnapKV, the rest by |Wo v|-weighted scores"),
          ("random", "RandomPress", (("seed", 0),), False, (),
           "kvpress Random: a seeded random subset (the floor every press must beat)"),
      )),
)
METHODS: dict[str, Method] = {m.name: m for m in REGISTRY}
# Names used in the paper/brief, accepted on the command line.
ALIASES: dict[str, str] = {a: m.name for m in REGISTRY for a in m.aliases}
# What each suite runs when nothing is asked for (``<suite>.methods`` / the run's ``modes`` unset).
DEFAULTS: dict[str, tuple[str, ...]] = {
    "translation": ("full", "anchor+src", "anchor"),
    "ppl": ("full", "ansan", "anchor"),
    "recall": ("full", "anchor", "streamingllm"),
    "longrange": ("full", "anchor", "streamingllm", "streamingllm_q"),
    "qa": ("full",),
}
# How the run's ``modes`` become a suite's methods (a mode not listed is itself): the paper's Table 2
# reads ``anchor`` both ways; the long-text readings skip the translation-only variant.
FROM_MODES: dict[str, dict[str, tuple[str, ...]]] = {
    "translation": {"anchor": ("anchor+src", "anchor")},
    "ppl": {n: () for n in ("anchor+src", *METHODS["anchor+src"].aliases)},
}


def names(suite: str, *, kinds: Sequence[str] | None = None) -> tuple[str, ...]:
    """The methods of ``suite`` in registry order (only those of ``kinds`` when given)."""
    if suite not in SUITES:
        raise ValueError(f"Unknown suite {suite!r}: choose one of {SUITES}.")
    return tuple(m.name for m in REGISTRY if suite in m.suites and (kinds is None or m.kind in kinds))


def needs_anchors(name: str) -> bool:
    """Whether ``name`` needs an anchor-aware model (False for names not in the registry)."""
    m = METHODS.get(ALIASES.get(name, name))
    return m is not None and m.needs_anchors


def canonical(name: str, suite: str = "translation") -> str:
    """Validate a method name of ``suite`` (accepting :data:`ALIASES`)."""
    m = ALIASES.get(name, name)
    allowed = names(suite)
    if m not in allowed:
        raise ValueError(f"Unknown method {name!r}: choose one of {allowed} (aliases: {sorted(ALIASES)}).")
    return m


PPL_METHODS = names("ppl")
NEEDS_ANCHORS = tuple(m for m in PPL_METHODS if needs_anchors(m))
assert all(set(d) <= set(names(s)) for s, d in DEFAULTS.items()), "a default is not a method of its suite"


def ppl_method(name: str, suite: str = "ppl") -> str:
    """Validate a method of the long-text readings (``suite``: ppl, recall or longrange; aliases such
    as ``causal`` accepted). The kvpress presses are recall/longrange methods, not ppl ones."""
    if suite not in READINGS:
        raise ValueError(f"{suite!r} is not a long-text reading: choose one of {READINGS}.")
    m = ALIASES.get(name, name)
    allowed = names(suite)
    if m in allowed:
        return m
    if m == "anchor+src":
        raise ValueError("anchor+src keeps the first chunk whole; it is a translation variant, not a PPL method.")
    if m in METHODS:
        raise ValueError(f"Method {name!r} is not a {suite} method: choose one of {allowed}.")
    raise ValueError(f"Unknown method {name!r}: choose one of {allowed} (aliases: {sorted(ALIASES)}).")


def press_of(name: str) -> Method | None:
    """The registry entry of ``name`` when it is a kvpress method in the long-text readings (``kind``
    ``press``), else None (the QA suite also compresses ``streamingllm``/``knorm`` with their press)."""
    m = METHODS.get(ALIASES.get(name, name))
    return m if m is not None and m.kind == "press" else None


def runnable_methods(methods: Sequence[str], anchor_aware: bool) -> tuple[list[str], list[str]]:
    """``(methods a model can be read with, methods skipped)``: a model without anchor settings has
    no anchor/AnSAN/sentence reading. The one statement of that rule (every suite, the study report)."""
    if anchor_aware:
        return list(methods), []
    return [m for m in methods if not needs_anchors(m)], [m for m in methods if needs_anchors(m)]


def suite_methods(suite: str, requested: Sequence[str] | None, model: Any, notes: list[str]) -> list[str]:
    """The long-text readings a suite runs on ``model``: ``requested`` (else the suite's default),
    validated, minus what needs anchors on a model without them (said once in ``notes``)."""
    from ..modeling import is_anchor_aware

    methods = [ppl_method(m, suite) for m in (requested or DEFAULTS[suite])]
    methods, skipped = runnable_methods(methods, is_anchor_aware(model))
    note = f"{suite}: no anchor settings, so {', '.join(skipped)} was skipped."
    if skipped and note not in notes:
        notes.append(note)
    return methods


# ---- run config -------------------------------------------------------------------------------------


def opt(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.key`` (a mapping, a DictConfig or an object), ``default`` when absent or None."""
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _as_list(x: Any) -> list[Any]:
    return [x] if isinstance(x, str) else list(x)


_SKIPPED_NOTES = {
    "ppl": "ppl: the model has no anchor settings, so anchor methods were skipped ({}).",
    "translation": "translation: the model has no anchor settings, so only full attention was evaluated (skipped {}).",
}


def resolve_methods(section: Any, run_modes: Sequence[str] | str | None, anchor_aware: bool,
                    suite: str) -> tuple[list[str], list[str]]:
    """Methods ``suite`` runs and notes on what was skipped: ``<suite>.methods`` (``section``) wins;
    else the run's ``modes`` mapped by :data:`FROM_MODES`; else :data:`DEFAULTS`. A model without
    anchor settings runs what :func:`runnable_methods` leaves (at least ``full``)."""
    check = (lambda m: ppl_method(m, suite)) if suite in READINGS else (lambda m: canonical(m, suite))
    explicit = opt(section, "methods")
    if explicit:
        methods = [check(m) for m in _as_list(explicit)]
        if suite != "translation":  # an explicit translation list runs as given
            methods = list(dict.fromkeys(methods))
    else:
        methods = []
        for mode in _as_list(run_modes) if run_modes else DEFAULTS[suite]:
            for c in FROM_MODES.get(suite, {}).get(mode, (mode,)):
                c = check(c)
                if c not in methods:
                    methods.append(c)
    notes: list[str] = []
    if not anchor_aware:
        methods, dropped = runnable_methods(methods, anchor_aware)
        methods = methods or ["full"]
        if dropped:
            notes.append(_SKIPPED_NOTES[suite].format(", ".join(dropped)))
    return methods, notes


# ---- the model side: a method's cache and attention rule ---------------------------------------------


def new_cache(name: str, position_mode: str = "true") -> Any:
    """A fresh cache for ``name`` (one per batch); ``position_mode`` is the anchor caches' (``"true"``
    positions, or the authors' ``"compact"`` renumbering). None for the cache-less baselines."""
    from transformers.cache_utils import DynamicCache

    from ..cache import AnchorCache

    kind = METHODS[ALIASES.get(name, name)].cache
    if kind == "anchor":
        return AnchorCache(position_mode=position_mode)  # type: ignore[arg-type]
    if kind == "anchor+src":
        return AnchorCache(keep_prefix=True, position_mode=position_mode)  # type: ignore[arg-type]
    return DynamicCache() if kind == "full" else None


@contextlib.contextmanager
def attention(model: Any, name: str) -> Iterator[None]:
    """The attention rule of ``name`` on ``model``: causal (the AnSAN rule off, a no-op on a plain
    model), the model's AnSAN rule, or AnSAN with earlier anchors hidden (``sentence``)."""
    from ..modeling import anchor_attention, anchor_options, is_anchor_aware

    name = ALIASES.get(name, name)
    rule = METHODS[name].attention
    if rule == "causal":
        with anchor_attention(model, enabled=False):
            yield
        return
    if not is_anchor_aware(model):
        raise ValueError(
            f"Method {name!r} needs an anchor-aware model (AnSAN); this model has no anchor settings. "
            "Use method 'full', or load an AnLLM checkpoint / prepare the model with anchors (mode 'ep'|'ac')."
        )
    with anchor_options(model, hide_anchors=True) if rule == "sentence" else contextlib.nullcontext():
        yield
