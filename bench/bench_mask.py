"""Mask construction: our AnSAN mask vs a faithful re-implementation of the authors' code.

The authors (pangjh3/AnLLM, ``codes/llama_sft_forward_thisversion_new.py``,
``llamamodel_forward_onlyfortraining``) build the training mask inside a replaced ``LlamaModel.forward``:
for each sample of the batch (a Python loop) a dense ``[L, L]`` additive float mask in the model's
dtype is filled with ``finfo.min``, the causal part is zeroed with ``masked_fill_``, then for each
anchor (a second Python loop) the finished sentence's columns are blanked for all later rows and the
anchor's row loses all earlier anchors; padding rows/columns (found by the pad id) are blanked; the
samples are concatenated to ``[B, 1, L, L]``. :func:`authors_mask` below re-implements that
algorithm (same loops, dtype and fill value) in our own words.

Ours: ``anllm.ansan_mask`` (vectorised rule, bool ``[B, L, L]``) and the mask the prepared model's
forward hook builds (``[B, 1, L, L]``: bool for SDPA, additive float for eager). Every candidate is
checked against the authors' mask before timing. Reference rows show the floor of any dense mask
(writing a causal bool ``[B, 1, L, L]``) and the O(L) token layout that a non-dense backend
(flex_attention's ``mask_mod``) needs. (The engine's long-row path evaluates the rule once per run of
identical queries, ``anllm.masks._run_table_mask``; it is what ``ansan_mask`` uses here.)

    .venv/bin/python bench/bench_mask.py                      # L = 1k, 4k, 8k
    .venv/bin/python bench/bench_mask.py --lengths 1024 16384 --batch 1 --repeat 9
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    machine_info,
    median,
    print_table,
    setup_threads,
    time_side_by_side,
    write_results,
)

import anllm
from anllm.anchors import AnchorConfig
from anllm.masks import layout_from_tokens

# Llama-2 ids as in the authors' EP scripts: "." is 29889, the added pad token is 32000.
ANCHOR_ID = 29889
PAD_ID = 32000
VOCAB = 32000


# --- the authors' algorithm, re-implemented --------------------------------------------------------
def authors_mask(
    input_ids: torch.Tensor, anchor_ids: list[int], pad_id: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive ``[B, 1, L, L]`` mask (0 = attend, finfo.min = blocked), built the way the authors do."""
    batch, length = input_ids.shape
    neg = torch.finfo(dtype).min
    per_sample = []
    for b in range(batch):  # one sample at a time
        row_ids = input_ids[b]
        m = torch.full((length, length), neg, dtype=dtype)
        cols = torch.arange(length)
        m.masked_fill_(cols < (cols + 1).view(length, 1), 0)  # causal
        hit = row_ids == anchor_ids[0]
        for other in anchor_ids[1:]:
            hit += row_ids == other
        if torch.sum(hit) != 0:
            anchors = torch.nonzero(hit).squeeze().tolist()
            if not isinstance(anchors, list):
                anchors = [anchors]
            sentence_start = 0
            for n, a in enumerate(anchors):  # one anchor at a time
                m[a + 1 :, sentence_start:a] = (
                    neg  # later rows lose the finished sentence (not its anchor)
                )
                sentence_start = a + 1
                m[a, anchors[:n]] = neg  # the anchor loses every earlier anchor
        pads = torch.nonzero(row_ids == pad_id).squeeze().tolist()
        m[pads, :] = neg
        m[:, pads] = neg
        per_sample.append(m.unsqueeze(0))
    return torch.cat(per_sample, dim=0).to(dtype).unsqueeze(1)


# --- inputs --------------------------------------------------------------------------------------
def make_batch(batch: int, length: int, tokens_per_anchor: int, pad_fraction: float, seed: int = 0):
    """Random token ids with an anchor ending each "sentence" (lengths uniform around the mean);
    every row after the first is right-padded by ``pad_fraction`` to exercise the padding path."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, ANCHOR_ID - 1, (batch, length), generator=g)
    lo, hi = max(2, tokens_per_anchor // 5), max(3, 2 * tokens_per_anchor - tokens_per_anchor // 5)
    for b in range(batch):
        pos = -1
        while True:
            pos += int(torch.randint(lo, hi + 1, (1,), generator=g))
            if pos >= length:
                break
            ids[b, pos] = ANCHOR_ID
        ids[b, 0] = 1  # BOS
        if b > 0 and pad_fraction > 0:
            ids[b, length - int(length * pad_fraction) :] = PAD_ID
    return ids, (ids != PAD_ID).long()


def hook_mask_fn(attn_implementation: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The exact code path of a prepared model's forward pre-hook (ids + 2D mask -> 4D mask), no cache."""
    from anllm.models.tiny import tiny_llama

    model = tiny_llama(attn_implementation=attn_implementation)
    model.config.anllm = AnchorConfig(mode="ep", anchor_token_ids=[ANCHOR_ID]).to_dict()
    anllm.prepare_model(model, None)  # re-apply the saved settings (EP needs no tokenizer then)
    hook = model._anllm_attention

    def build(ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
        _, kwargs = hook._pre_forward(
            model, (), {"input_ids": ids, "attention_mask": am, "use_cache": False}
        )
        return kwargs["attention_mask"]

    return build


def as_allowed(mask: torch.Tensor) -> torch.Tensor:
    """Any candidate's mask as bool ``[B, L, L]`` (True = may attend)."""
    if mask.dim() == 4:
        mask = mask[:, 0]
    return mask if mask.dtype == torch.bool else mask == 0


Build = Callable[[], torch.Tensor]


def candidates(
    ids: torch.Tensor,
    am: torch.Tensor,
    dtypes: list[str],
    hook_sdpa: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    hook_eager: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[dict[str, Build], dict[str, Build]]:
    """(candidates checked against the authors' mask, reference rows) for one batch."""
    anchor_ids = torch.tensor([ANCHOR_ID])
    B, L = ids.shape
    cands: dict[str, Build] = {}
    for dt in dtypes:
        dtype = getattr(torch, dt)
        cands[f"authors ({dt})"] = lambda dtype=dtype: authors_mask(ids, [ANCHOR_ID], PAD_ID, dtype)
    cands["ours: anllm.ansan_mask (bool)"] = lambda: anllm.ansan_mask(
        anllm.anchor_mask(ids, anchor_ids), am
    )
    cands["ours: model hook, sdpa (bool 4D)"] = lambda: hook_sdpa(ids, am)
    cands["ours: model hook, eager (float 4D)"] = lambda: hook_eager(ids, am)
    refs: dict[str, Build] = {
        "ref: causal bool 4D, fresh alloc (dense floor)": lambda: torch.ones(
            (B, 1, L, L), dtype=torch.bool
        ).tril_(),
        "ref: token layout only, O(L)": lambda: layout_from_tokens(
            anllm.anchor_mask(ids, anchor_ids), am
        ),
    }
    return cands, refs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument(
        "--tokens-per-anchor", type=int, default=25, help="mean sentence length (realistic: ~25)"
    )
    p.add_argument("--pad-fraction", type=float, default=0.1, help="right padding of rows 2..B")
    p.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], help="dtype(s) of the authors' mask"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    setup_threads(args.threads)
    machine = machine_info()

    hook_sdpa, hook_eager = hook_mask_fn("sdpa"), hook_mask_fn("eager")
    results, rows = [], []
    for L in args.lengths:
        ids, am = make_batch(args.batch, L, args.tokens_per_anchor, args.pad_fraction)
        n_anchors = int((ids == ANCHOR_ID).sum())
        cands, refs = candidates(ids, am, args.dtypes, hook_sdpa, hook_eager)
        # Same mask first: every candidate must agree with the authors' rule exactly.
        want = as_allowed(authors_mask(ids, [ANCHOR_ID], PAD_ID, torch.float32))
        for name, fn in cands.items():
            got = as_allowed(fn())
            if not torch.equal(got, want):
                bad = (got != want).nonzero()[:5].tolist()
                raise SystemExit(
                    f"MISMATCH at L={L}: {name} differs from the authors' mask at {bad}"
                )
        del want

        times = time_side_by_side({**cands, **refs}, args.warmup, args.repeat)
        base = {dt: median(times[f"authors ({dt})"]) for dt in args.dtypes}
        b0 = base[args.dtypes[0]]
        for name, ts in times.items():
            t = median(ts)
            row = {
                "length": L,
                "batch": args.batch,
                "anchors": n_anchors,
                "candidate": name,
                "median_ms": 1e3 * t,
                "times_ms": [1e3 * x for x in ts],
                **{f"speedup_vs_authors_{dt}": base[dt] / t for dt in args.dtypes},
            }
            results.append(row)
            rows.append([L, n_anchors, name, 1e3 * t, *(base[dt] / t for dt in args.dtypes)])
        print(f"L={L}: checked identical masks; authors {b0 * 1e3:.1f} ms", flush=True)

    print_table(
        f"AnSAN mask construction, batch {args.batch}, ~1 anchor / {args.tokens_per_anchor} tokens "
        f"(median of {args.repeat}, {torch.get_num_threads()} threads)",
        ["L", "anchors", "candidate", "ms", *(f"× vs authors {dt}" for dt in args.dtypes)],
        rows,
    )
    write_results(
        "bench_mask",
        machine,
        {
            "settings": vars(args),
            "authors_code": "pangjh3/AnLLM codes/llama_sft_forward_thisversion_new.py: llamamodel_forward_onlyfortraining",
            "goal": "ours >= 50x faster than the authors at L=8192",
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
