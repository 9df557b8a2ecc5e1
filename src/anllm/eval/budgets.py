"""Equal-cache budgets: how many keys each token attends under the anchor reading.

The training-free baselines (:mod:`anllm.eval.baselines`) are run at the anchor reading's cache:
``peak`` (one number per sequence, the most keys any token attends under the model's AnSAN rule:
equal peak memory) or ``per-query`` (each token attends as many keys as it does under the rule:
equal attention cost). A model without anchors gets the budget an AC model would get for the same
text: the last token of every sentence plays the anchor. Used by the perplexity suite, the recall
probe and the long-range suite (see :mod:`anllm.eval.methods` for which method takes which budget).
"""

from __future__ import annotations

from typing import Any

import torch

from . import baselines
from .methods import press_of


def document_budget(model: Any, tokenizer: Any, text: str, ids: torch.Tensor) -> int:
    """Keys per token the equal-cache baselines get for one document: the anchor cache's peak (the most
    keys any token attends under the model's AnSAN rule); without anchors, the last token of every
    sentence plays the anchor (what an AC model would keep for the same text)."""
    return int(query_budgets(model, tokenizer, text, ids).max())


def query_budgets(model: Any, tokenizer: Any, text: str, ids: torch.Tensor, hide_anchors: bool = False) -> torch.Tensor:
    """``[L]``: the keys each token of one document attends under the model's AnSAN rule (its sinks,
    anchors, open sentence and window); without anchors, as :func:`document_budget` says.
    ``hide_anchors``: the same under the sentence-only control."""
    from dataclasses import replace

    is_anchor, options = anchor_tokens(model, tokenizer, text, ids)
    return baselines.ansan_keys_per_query(is_anchor, replace(options, hide_anchors=hide_anchors))


def anchor_tokens(model: Any, tokenizer: Any, text: str, ids: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``([L] bool, AnsanOptions)``: the anchors of one document and the rule they are read with: the
    model's own (its anchor ids, its options), or for a model without anchors the last token of every
    sentence under the plain rule."""
    from ..masks import AnsanOptions

    att = getattr(model, "_anllm_attention", None)
    if att is not None and att.cfg.enabled:
        return torch.isin(ids.cpu(), att.anchor_ids), att.options
    is_anchor = sentence_end_tokens(tokenizer, text, len(ids)).clone()
    # The text's last token is never an anchor: an AC model reads an <AC> *after* a finished last
    # sentence, and an open one (a recall cue) has none; marking it would shrink its own budget.
    is_anchor[-1:] = False
    return is_anchor, AnsanOptions()


def keys_per_query(method: str, length: int, budget: int | None, per_query: torch.Tensor | None,
                   sentence: torch.Tensor | None, context_len: int | None = None) -> torch.Tensor:
    """``[L]``: the keys each token of a document attends under ``method`` (``full``: every earlier
    token; ``anchor``/``ansan``: the AnSAN rule's row; ``sentence``: the control's; StreamingLLM and
    K-norm: their budget, capped by the tokens read so far; a kvpress press: every earlier token while
    the first ``context_len - 1`` tokens are read, then the kept cache the anchor reading holds at
    token ``context_len - 1`` plus what came after it). Its mean is the attention cost and mean
    memory, its max the peak a token-by-token reader holds."""
    q = torch.arange(1, length + 1)
    if method == "full":
        return q
    if press_of(method) is not None:
        if context_len is None or per_query is None:
            raise ValueError(f"Method {method!r} compresses once after the context: give context_len and per_query.")
        c = context_len - 1  # the token read against the compressed cache first
        after = int(per_query[c]) + torch.arange(length - c)
        return torch.cat([q[:c], torch.minimum(after, q[c:])])
    if method in ("anchor", "ansan", baselines.PER_QUERY):
        return per_query
    if method == "sentence":
        return sentence
    return q.clamp(max=int(budget))


def mean_keys_per_query(method: str, length: int, budget: int | None, per_query: torch.Tensor | None,
                        sentence: torch.Tensor | None, context_len: int | None = None) -> float:
    """The mean of :func:`keys_per_query`."""
    return float(keys_per_query(method, length, budget, per_query, sentence, context_len).double().mean())


def sentence_end_tokens(tokenizer: Any, text: str, length: int) -> torch.Tensor:
    """``[length]`` bool: the token that ends each sentence of ``text`` (the splitter's sentences)."""
    from ..anchors import sentence_spans

    enc = tokenizer(text, return_offsets_mapping=True)
    ends = torch.tensor([e for _, e in enc["offset_mapping"]][:length])
    out = torch.zeros(len(ends), dtype=torch.bool)
    for _, end in sentence_spans(text):
        hit = torch.nonzero(ends >= end)
        if len(hit):
            out[int(hit[0])] = True
    return out
