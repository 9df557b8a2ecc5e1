"""The held-out check at the end of a training run: did the anchors learn?

On documents the run never trained on (the data config's held-out split, :mod:`anllm.data.split`),
the evaluation code of ``evaluate.py suite=ppl tasks=[holdout]`` (:func:`anllm.eval.ppl_core.score_documents`)
measures full-attention PPL, anchor-inference PPL with the AnchorCache, C⇓ and MaxKV — for the
trained model and for the starting model (measured before training, cached under ``cache_dir`` so a
re-run or a resumed run does not pay for it twice). The result is printed as a small table and saved
in the run's summary JSON under ``heldout``.

``heldout.enabled``: ``false`` (default), ``true``, or ``auto`` (scale=demo): on for a single process,
off on multi-process runs (the check runs on one rank while the others wait; ask with ``true``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

logger = logging.getLogger("anllm.train")

DEFAULTS = {"enabled": False, "num_documents": 8, "max_tokens": 512, "min_chars": 500, "chunk_size": 256}


def settings(c: Mapping[str, Any], world_size: int = 1) -> tuple[dict[str, Any] | None, str | None]:
    """``(settings, None)`` when the check runs, else ``(None, one-line reason)``."""
    from ..data.split import has_holdout

    s = {**DEFAULTS, **dict(c.get("heldout") or {})}
    enabled = s["enabled"]
    if enabled in (False, None, "false"):
        return None, "held-out check off (heldout.enabled=false; turn on with heldout.enabled=true)"
    if enabled == "auto" and world_size > 1:
        return None, f"held-out check skipped on {world_size} processes (heldout.enabled=true runs it on rank 0)"
    if not has_holdout(c["data"]):
        return None, "held-out check skipped: the data config holds no documents out (set data.holdout_fraction)"
    if c.get("deepspeed") and (c["deepspeed"].get("zero_optimization") or {}).get("stage") == 3:
        return None, "held-out check skipped under ZeRO-3 (partitioned weights); run evaluate.py on the saved model"
    return s, None


def validate(c: Mapping[str, Any]) -> None:
    """Config errors before anything slow happens."""
    from ..data.split import has_holdout

    s = {**DEFAULTS, **dict(c.get("heldout") or {})}
    unknown = sorted(set(s) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"Unknown key heldout.{unknown[0]}: known keys are {', '.join(DEFAULTS)}.")
    if s["enabled"] not in (True, False, "auto", None):
        raise ConfigError(f"heldout.enabled={s['enabled']!r}: use true, false or auto.")
    if s["enabled"] is True and c["data"].get("kind") not in ("jsonl", "demo"):
        raise ConfigError("heldout.enabled=true needs local data (data=jsonl or demo) with a held-out split.")
    if s["enabled"] is True and not has_holdout(c["data"]):
        raise ConfigError("heldout.enabled=true but the data config holds no documents out: set "
                          "data.holdout_fraction=0.05 (and/or data.holdout_paths=[...]).")
    for key in ("num_documents", "max_tokens", "chunk_size"):
        if int(s[key]) < 1:
            raise ConfigError(f"heldout.{key} must be >= 1, got {s[key]}.")


def ppl_config(c: Mapping[str, Any], s: Mapping[str, Any]) -> dict[str, Any]:
    """The same check as ``evaluate.py suite=ppl tasks=[holdout]`` with these keys (for reproducing it)."""
    from ..data.sources import default_base_dir

    data = {k: v for k, v in c["data"].items() if k != "id"}
    data["base_dir"] = str(data.get("base_dir") or default_base_dir())
    return {"limit": int(s["num_documents"]), "ppl": {"data": data, "data_base_dir": data.get("base_dir"),
            "select": "spread", "min_chars": int(s["min_chars"]), "max_tokens": int(s["max_tokens"]),
            "chunk_size": int(s["chunk_size"]), "methods": None}}


def documents(c: Mapping[str, Any], s: Mapping[str, Any]) -> list[tuple[str, str]]:
    from ..eval.documents import documents_for

    return documents_for(ppl_config(c, s), "holdout")


def measure(model: Any, tokenizer: Any, docs: list[tuple[str, str]], s: Mapping[str, Any]) -> dict[str, Any]:
    """Full and anchor PPL (plus C⇓, MaxKV) through the perplexity suite's own scoring core."""
    import torch

    from ..eval.ppl_core import score_documents
    from ..modeling import get_anchor_config, is_anchor_aware

    cfg = get_anchor_config(model)
    anchor = cfg.to_dict() if cfg is not None and cfg.enabled else None
    methods = ["full", "anchor"] if is_anchor_aware(model) else ["full"]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            rows = score_documents(model, tokenizer, anchor, docs, methods, task="holdout", progress=False,
                                   max_tokens=int(s["max_tokens"]), chunk_size=int(s["chunk_size"]))
    finally:
        model.train(was_training)
    by = {r["method"]: r for r in rows}
    out = {"documents": len(docs), "tokens": by["full"]["kv_total"], "ppl_full": by["full"]["ppl"]}
    if "anchor" in by:
        out.update(ppl_anchor=by["anchor"]["ppl"], c_red=by["anchor"]["c_red"], max_kv=by["anchor"]["max_kv"])
    return out


def start_key(c: Mapping[str, Any], s: Mapping[str, Any], docs: list[tuple[str, str]]) -> str:
    ident = {"model": c["model"], "anchor": c["anchor"], "settings": {k: s[k] for k in DEFAULTS if k != "enabled"},
             "docs": [d for d, _ in docs], "texts": hashlib.sha256("".join(t for _, t in docs).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def start_numbers(model: Any, tokenizer: Any, c: Mapping[str, Any], s: Mapping[str, Any],
                  docs: list[tuple[str, str]]) -> dict[str, Any]:
    """The starting model's numbers, from the cache or measured now (call before training)."""
    path = Path(str(c["cache_dir"])).expanduser().parent / "heldout" / f"{start_key(c, s, docs)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    numbers = measure(model, tokenizer, docs, s)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(numbers, indent=1))
    tmp.replace(path)
    return numbers


def table(start: Mapping[str, Any], end: Mapping[str, Any]) -> str:
    """One line per quantity, start → trained."""
    lines = [f"held-out check ({end['documents']} docs, {end['tokens'] / 1000:.1f}k tokens never trained on): start → trained"]
    lines.append(f"  full-attention PPL    {start['ppl_full']:9.2f} → {end['ppl_full']:.2f}")
    if "ppl_anchor" in end:
        drop = start["ppl_anchor"] / end["ppl_anchor"] if "ppl_anchor" in start else float("nan")
        lines.append(f"  anchor PPL (cache)    {start.get('ppl_anchor', float('nan')):9.2f} → {end['ppl_anchor']:.2f}"
                     f"   ({drop:.1f}x lower)")
        lines.append(f"  C⇓ {100 * end['c_red']:.1f}%   MaxKV {end['max_kv']:.1f} keys/values (vs {end['tokens'] / end['documents']:.0f} per document)")
    return "\n".join(lines)
