"""The field's KV-cache presses (NVIDIA kvpress 0.5) as equal-cache baselines: compress once.

Used by QA, the recall probe and the long-range tasks (:func:`press_prefill`). A context is read
with full (causal) attention and its cache is then compressed to ``budget`` entries per row, the number the :class:`anllm.AnchorCache` holds for the same context at that point. This is how the
field's methods work, and they come from NVIDIA's ``kvpress`` (0.5): StreamingLLM, K-norm, SnapKV,
TOVA, ObservedAttention (H2O-style), Expected Attention, PyramidKV and the other presses that apply
to a Llama-architecture model on CPU without downloaded weights (one registry entry each, see
:mod:`anllm.eval.methods`). The press is used as kvpress documents it: a context manager that hooks
the attention layers during one prefill forward. What follows is then fed against the compressed
cache with true positions (kept keys keep their RoPE rotation).

The every-token-bounded readings (StreamingLLM, K-norm from the start) are :mod:`anllm.eval.baselines`.

Exact budgets: kvpress asks for a ``compression_ratio`` and keeps ``int(n_tokens * (1 - ratio))``
entries per layer and KV head (PyramidKV: per-layer budgets that average ``round(n_tokens * (1 -
ratio))``). :func:`make_press` picks the ratio halfway between two counts, so float rounding can never
move it, and :func:`press_prefill` checks every row's count. Press options that assume long contexts
are fitted to the row: sinks (``n_sink``, ``num_sinks``, ``sink_size_start``) are the run's
``num_sink_tokens`` capped at half the budget (as ``streamingllm``'s), and SnapKV/PyramidKV's
observation window (64) is at most half the budget and shorter than the context. PyramidKV keeps
kvpress's rule: its layers get a pyramid (more keys low, fewer high; ``budget`` on average) only when
the smallest layer budget (``budget / beta``, beta 20) still covers the window, else every layer keeps
``budget`` with SnapKV's scores; at anchor-cache budgets of tens to hundreds that is the usual case.

Rows are compressed one at a time: a press sees one unpadded sequence and one ratio (padding would be
scored as tokens and sinks would land on it; rows need different ratios), so the prefill of a batch
is a loop of single-row forwards; the compressed rows are then left-padded into one cache and what
follows is fed as one batch. The cost is the batching lost in the prefill only. On CPU there is none
(SmolLM2-135M, 1 thread, 8 contexts: 100-200 tokens, one left-padded batched prefill 7.4 s, eight
single-row prefills 5.0 s, with a press 4.1-6.1 s; 500-900 tokens, 40 s batched vs 33 s by rows,
25-36 s with a press: rows skip the padding, and scoring is a small part). On a GPU a batch of short
contexts prefills in about the time of one, so the loop can cost up to ``batch_size`` times the
batched prefill there (not measured; long contexts fill the device row by row and lose little).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers.cache_utils import DynamicCache

from . import methods as registry
from ..modeling import attention_backend
from .baselines import masked_attention

SNAPKV_WINDOW = 64  # kvpress's default observation window (SnapKV, PyramidKV)
_SINK_FIELDS = ("n_sink", "num_sinks", "sink_size_start")


def load_kvpress() -> Any:
    """Import kvpress (before any timing: the import takes about a second), with a one-line error naming
    the fix when it is missing.

    kvpress wraps every function in transformers' attention registry on import, for its head-wise
    presses (they hide evicted keys at decode time through ``module.masked_key_indices``). None of the
    presses used here is head-wise, and the wrapper passes ``dropout`` positionally, which breaks
    ``flex_attention`` (``TypeError: flex_attention_forward() got multiple values for argument
    'scaling'``, kvpress 0.5.5 with transformers 4.57) for every model of the process. So when this is
    the first import of kvpress, transformers' own functions are registered back right after it.
    """
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    first = "kvpress" not in sys.modules
    before = dict(ALL_ATTENTION_FUNCTIONS.items()) if first else {}
    try:
        import kvpress
    except ImportError as e:  # pragma: no cover - kvpress is a dependency
        raise ImportError("The kvpress baselines need NVIDIA's kvpress (pip install 'kvpress>=0.5,<0.6'; "
                          "`make install` installs it).") from e
    for name, fn in before.items():  # the mapping kvpress itself writes to
        ALL_ATTENTION_FUNCTIONS[name] = fn
    return kvpress


def press_spec(method: str) -> registry.Method:
    """The registry entry of a method that compresses with a kvpress press (ValueError otherwise)."""
    m = registry.METHODS.get(registry.ALIASES.get(method, method))
    if m is None or m.press is None:
        presses = [x.name for x in registry.REGISTRY if x.press is not None]
        raise ValueError(f"Unknown press baseline {method!r}: choose from {presses}.")
    return m


def make_press(method: str, length: int, keep: int, num_sink_tokens: int = 4) -> Any:
    """A kvpress press for ``method`` that keeps exactly ``keep`` of ``length`` context entries per
    layer and KV head (PyramidKV: ``keep`` on average over layers). Needs ``0 < keep < length``.
    A wrapper press (``press_options`` with ``press``: a class name, e.g. CriticalKV around SnapKV)
    gets its inner press built the same way."""
    if not 0 < keep < length:
        raise ValueError(f"A press keeps 0 < keep < length entries, got keep={keep}, length={length}.")
    spec = press_spec(method)
    kvpress = load_kvpress()
    opts = dict(spec.press_options)
    inner = opts.pop("press", None)
    if inner is not None:  # the wrapper reads (and sets) its inner press's compression_ratio
        return getattr(kvpress, spec.press)(press=_scorer(getattr(kvpress, inner), {}, length, keep, num_sink_tokens),
                                            **opts)
    return _scorer(getattr(kvpress, spec.press), opts, length, keep, num_sink_tokens)


def _scorer(cls: type, opts: dict[str, Any], length: int, keep: int, num_sink_tokens: int) -> Any:
    """``cls(compression_ratio=..., **opts)`` with the ratio that keeps ``keep`` of ``length`` and the
    options that assume long contexts fitted to this one (see the module doc)."""
    kvpress = load_kvpress()
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    opts = dict(opts)
    for name in _SINK_FIELDS:
        if name in defaults:
            opts[name] = min(int(opts.get(name, num_sink_tokens)), keep // 2)
    if "window_size" in defaults:
        window = int(opts.get("window_size", defaults["window_size"] or SNAPKV_WINDOW))
        opts["window_size"] = max(1, min(window, keep // 2, length - 1))
    if issubclass(cls, kvpress.PyramidKVPress):
        # Its layer budgets average length * (1 - ratio), rounded: the exact count, not a count + 1/2.
        ratio = 1.0 - keep / length
    else:
        # ScorerPress keeps int(length * (1 - ratio)): halfway between keep and keep + 1 is safe from float error.
        ratio = 1.0 - (keep + 0.5) / length
        if kvpress.utils.compute_n_kept(length, ratio) != keep:  # pragma: no cover - a kvpress change
            raise RuntimeError(f"kvpress would not keep {keep} of {length} entries at compression_ratio={ratio}.")
    return cls(compression_ratio=ratio, **opts)


def _decoder(model: Any) -> Any:
    """The decoder stack the press hooks (kvpress reads ``model.model.layers``): the prefill runs it
    alone, without the LM head, whose logits nobody reads."""
    decoder = getattr(model, "model", None)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "rotary_emb"):
        raise ValueError(f"kvpress presses need a Llama-architecture decoder (model.model.layers with RoPE); "
                         f"{type(model).__name__} has none.")
    return decoder


@dataclass
class Pressed:
    """Compressed context caches of a batch, left-padded into one :class:`DynamicCache`.

    ``valid[b, layer, slot]``: whether the slot holds a kept entry of row ``b`` in that layer (kept
    entries are right-aligned; layers can differ, PyramidKV's do). ``kept[b]``: entries kept per layer
    (PyramidKV: the mean over layers, rounded). ``lengths[b]``: tokens the row's context had.
    """

    cache: DynamicCache
    valid: torch.Tensor
    kept: list[int]
    lengths: list[int]

    def select(self, rows: torch.Tensor) -> None:
        """Keep/repeat rows (one per continuation), as ``DynamicCache.batch_select_indices`` does."""
        self.cache.batch_select_indices(rows)
        self.valid = self.valid[rows.to(self.valid.device)]
        idx = rows.tolist()
        self.kept = [self.kept[i] for i in idx]
        self.lengths = [self.lengths[i] for i in idx]

    def forward(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                **kwargs: Any) -> Any:
        """Feed ``input_ids`` (``attention_mask``: 1 = real token, any padding side) after the compressed
        contexts, causal attention (the anchor rule off): each layer attends its own kept entries."""
        from ..modeling import anchor_attention, is_anchor_aware

        B, q = input_ids.shape
        dev = input_ids.device
        feed = attention_mask.to(dev).bool()
        new = torch.ones((q, q), dtype=torch.bool, device=dev).tril()[None] & feed[:, None, :]
        new = new | torch.eye(q, dtype=torch.bool, device=dev)[None]  # a padding query sees itself: no empty row
        valid = self.valid.to(dev)
        masks = [torch.cat([valid[:, layer, None, :].expand(B, q, -1), new], -1)[:, None]
                 for layer in range(valid.shape[1])]
        off = anchor_attention(model, enabled=False) if is_anchor_aware(model) else contextlib.nullcontext()
        with off, layer_masks(model, masks):
            return model(input_ids=input_ids, attention_mask=masks[0], position_ids=position_ids,
                         past_key_values=self.cache, use_cache=True, **kwargs)


def layer_masks(model: Any, masks: list[torch.Tensor]) -> contextlib.AbstractContextManager[None]:
    """Run ``model`` with one bool mask per layer (``masks[layer]``: ``[B, 1, q, k]``): a compressed
    cache's layers can hold different entries in the same slots, which one shared mask cannot say."""
    return masked_attention(model, lambda module, query, key, attention_mask: masks[module.layer_idx])


@torch.no_grad()
def press_prefill(model: Any, method: str, contexts: Sequence[Sequence[int] | torch.Tensor], budgets: Sequence[int],
                  num_sink_tokens: int = 4, seed: int = 0) -> Pressed:
    """Read each context (token ids, no padding) with causal attention and compress its cache with
    ``method``'s kvpress press to ``budgets[b]`` entries (all of them when the context is no longer;
    none when the budget is 0). One forward per row, then the rows left-padded into one cache.

    Presses that draw random numbers (Leverage, Compactor) draw them under ``seed``, set again for
    every row, so a row's kept keys do not depend on the rows batched with it."""
    from ..modeling import anchor_attention, is_anchor_aware

    spec = press_spec(method)
    decoder = _decoder(model)
    device = next(model.parameters()).device
    rows: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = []
    kept: list[int] = []
    lengths: list[int] = []
    off = anchor_attention(model, enabled=False) if is_anchor_aware(model) else contextlib.nullcontext()
    n_layers = model.config.num_hidden_layers
    with off, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for ctx, budget in zip(contexts, budgets):
            torch.manual_seed(seed)
            ids = torch.as_tensor(ctx, dtype=torch.long).reshape(-1).to(device)
            L, n = int(ids.numel()), max(0, min(int(budget), int(ids.numel())))
            lengths.append(L)
            if n == 0:
                rows.append(None)
                kept.append(0)
                continue
            cache = DynamicCache()
            press = make_press(method, L, n, num_sink_tokens) if n < L else None
            with (press(model) if press is not None else contextlib.nullcontext()), \
                    attention_backend(model, "eager" if spec.eager and press is not None else None):
                decoder(input_ids=ids[None], past_key_values=cache, use_cache=True)
            layers = [(layer.keys, layer.values) for layer in cache.layers]
            widths = [k.shape[2] for k, _ in layers]
            if issubclass(type(press), _pyramid()):
                if abs(sum(widths) - n * len(widths)) > len(widths) // 2 + 1:  # pragma: no cover - a kvpress change
                    raise RuntimeError(f"{spec.press} kept {widths} entries per layer for a budget of {n}.")
            elif any(w != n for w in widths):  # pragma: no cover - a kvpress change
                raise RuntimeError(f"{spec.press} kept {widths} entries per layer, not {n}.")
            rows.append(layers)
            kept.append(round(sum(widths) / len(widths)))
    W = max([1] + [k.shape[2] for layers in rows if layers for k, _ in layers])  # one masked slot if all are empty
    B = len(rows)
    ref = next((layers[0][0] for layers in rows if layers), None)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = (B, cfg.num_key_value_heads, W, head_dim)
    dtype = ref.dtype if ref is not None else next(model.parameters()).dtype
    valid = torch.zeros((B, n_layers, W), dtype=torch.bool, device=device)
    out = DynamicCache()
    for layer in range(n_layers):
        k_all = torch.zeros(shape, dtype=dtype, device=device)
        v_all = torch.zeros(shape, dtype=dtype, device=device)
        for b, layers in enumerate(rows):
            if layers is None:
                continue
            k, v = layers[layer]
            w = k.shape[2]
            k_all[b, :, W - w :] = k[0]
            v_all[b, :, W - w :] = v[0]
            valid[b, layer, W - w :] = True
        out.update(k_all, v_all, layer)
    return Pressed(out, valid, kept, lengths)


def _pyramid() -> type:
    return load_kvpress().PyramidKVPress
