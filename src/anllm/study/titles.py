"""Names the study's report gives arms and methods, and the order it lists methods in.

The order is the evaluation registry's (:mod:`anllm.eval.methods`): the long-text readings that keep a
cache or bound one (kinds ``cache`` and ``baseline``); the ``ansan`` mask reading is left out because it
reads exactly what ``anchor`` reads (the cache is lossless), so a column of it would repeat anchor's.
"""

from __future__ import annotations

from typing import Any

from ..eval.methods import names

# The reading methods of the report's perplexity tables and figures, in registry order.
PPL_ORDER: tuple[str, ...] = names("ppl", kinds=("cache", "baseline"))
ARM_TITLES = {"baseline": "baseline (full attention)", "ep": "AnLLM-EP", "ac": "AnLLM-AC", "ac_sink": "AnLLM-AC + 4 sinks",
              "ac_sink_window": "AC + sinks + window", "ac_sink_distill": "AC + sinks + distillation",
              "ac_sink_window_distill": "AC + sinks + window + distillation",
              "ac_sink_distill_self": "AC + sinks + self-distillation"}
# Short table/legend titles (the registry's ``describe`` is a sentence); a method without one is shown by name.
_METHOD_TITLES = {"full": "full attention", "anchor": "anchor (AnchorCache)", "sentence": "sentence only (control)",
                  "streamingllm": "StreamingLLM, same peak cache", "streamingllm_q": "StreamingLLM, same keys per query",
                  "knorm": "K-norm, same cache", "ansan": "AnSAN mask (no cache)"}


def arm_title(arm: str) -> str:
    return ARM_TITLES.get(arm, arm)


def method_title(method: str) -> str:
    return _METHOD_TITLES.get(method, method)


def past_training(s: dict[str, Any], name: str) -> int | None:
    """The final set's length when it reads past the training block (a measure of extrapolation, not of
    the trained cache at the length it learned), else None."""
    n = ((s.get("final_sets") or {}).get(name) or {}).get("max_tokens")
    return n if n and s.get("block_size") and n > s["block_size"] else None


def set_title(s: dict[str, Any], name: str) -> str:
    """A final set's name, saying when it reads past the training block."""
    n = past_training(s, name)
    return f"{name} ({n / s['block_size']:g}× the {s['block_size']:,}-token training block)" if n else name


def tail_title(s: dict[str, Any], name: str | None = None) -> str:
    """Where a final set's tail starts ("after position 2,048"); without a name, the start every set with a
    tail shares (a table column); "of the tail" when the summary does not say or the sets differ."""
    sets = s.get("final_sets") or {}
    chosen = [sets.get(name)] if name is not None else list(sets.values())
    starts = {f.get("tail_from") for f in chosen if f and f.get("tail_from")}
    return f"after position {starts.pop():,}" if len(starts) == 1 else "of the tail"
