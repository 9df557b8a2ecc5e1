"""End-to-end generation: anllm (AnchorCache, chunked prefill) against the *plain* model's best full cache.

What a user compares: the anchor model with its pruned cache, versus the same weights as a plain
causal model (no anchor hook, no 4D mask) with the faster of transformers' full caches,
``DynamicCache`` and a preallocated ``StaticCache``. For the same prompts (real prose, SmolLM2-135M
in EP mode) each row times, one candidate after the other in one process:

* ``plain-dynamic`` / ``plain-static``: the plain model, one-shot prefill, greedy decode;
* ``anchor``: the anchor-aware model, prefill read into an ``AnchorCache`` in chunks (lossless:
  attention per chunk covers kept anchors + open sentence + the chunk), greedy decode (decode steps
  that see every kept slot pass no mask: SDPA's fast path);
* ``anchor-masked``: the same with a 4D mask on every decode step (to measure that fast path);
* ``anchor-window``: anchors + a local window of ``--window`` tokens (``anchor.window``, the window
  arms of the Evidence II study): the target is decode within 10% of ``anchor``'s tok/s;
* a reference: the anchor-aware model with a full ``DynamicCache`` (the AnSAN rule, nothing pruned):
  anllm's tokens must be identical to it (checked every row; a loud MISMATCH otherwise).

Prompts are ``equal`` (every row exactly L tokens, no padding) or ``ragged`` (lengths L ± 25%, left
padded: the plain model then needs a padding mask on every step too). Per row: prefill s, decode
tok/s (batch / median step), end-to-end s (prefill + all decode steps), and the speed-ups against
the best full cache for that row and metric.

    .venv/bin/python bench/bench_generate.py                       # the issue's grid (long: ~1 h on 2 cores)
    .venv/bin/python bench/bench_generate.py --grid 1x2048 --new-tokens 32   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers.cache_utils import DynamicCache, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_smollm2, machine_info, print_table, prose, setup_threads, write_results

import anllm
from anllm.eval.generation import DEFAULT_PREFILL_CHUNK, prefill
from anllm.modeling import anchor_options

RED, RESET = "\033[1;31m", "\033[0m"
DEFAULT_GRID = ["1x2048", "1x4096", "1x8192", "8x2048", "8x4096"]


def make_prompts(ids: torch.Tensor, batch: int, length: int, ragged: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` different stretches of prose, left-padded; ragged rows are length × U(0.75, 1.25)."""
    g = torch.Generator().manual_seed(seed + batch * 100_003 + length)
    lengths = [length] * batch
    if ragged:
        lengths = [int(length * (0.75 + 0.5 * float(torch.rand((), generator=g)))) for _ in range(batch)]
    width, start = max(lengths), 0
    ids_out = torch.zeros((batch, width), dtype=torch.long)
    am = torch.zeros((batch, width), dtype=torch.long)
    for b, n in enumerate(lengths):
        if start + n > ids.numel():
            raise SystemExit("not enough prose tokens: lower the grid")
        ids_out[b, width - n :] = ids[start : start + n]
        am[b, width - n :] = 1
        start += n
    return ids_out, am


@torch.inference_mode()
def greedy(model: Any, ids: torch.Tensor, am: torch.Tensor, cache: Any, new_tokens: int,
           read_prompt: Callable[..., Any]) -> dict[str, Any]:
    """Prefill with ``read_prompt``, then the greedy loop ``generate`` runs; times each part."""
    B, P = ids.shape
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    t0 = time.perf_counter()
    out = read_prompt(model, ids, am, pos, cache)
    prefill_s = time.perf_counter() - t0
    nxt = out.logits[:, -1].argmax(-1)
    tokens, steps = [nxt], []
    next_pos = am.sum(-1)
    for i in range(1, new_tokens):
        am = torch.cat([am, torch.ones((B, 1), dtype=am.dtype)], 1)
        t0 = time.perf_counter()
        out = model(input_ids=nxt[:, None], attention_mask=am, position_ids=next_pos[:, None], past_key_values=cache,
                    use_cache=True, cache_position=torch.tensor([P + i - 1]))
        steps.append(time.perf_counter() - t0)
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(nxt)
        next_pos = next_pos + 1
    med = statistics.median(steps)
    return {"prefill_s": prefill_s, "decode_step_median_s": med, "decode_tokens_per_s": B / med,
            "end_to_end_s": prefill_s + sum(steps), "tokens": torch.stack(tokens, 1)}


def one_shot(model: Any, ids: torch.Tensor, am: torch.Tensor, pos: torch.Tensor, cache: Any) -> Any:
    return model(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=cache, use_cache=True,
                 cache_position=torch.arange(ids.shape[1]), logits_to_keep=1)


def chunked(chunk: int) -> Callable[..., Any]:
    def read(model: Any, ids: torch.Tensor, am: torch.Tensor, pos: torch.Tensor, cache: Any) -> Any:
        return prefill(model, ids, am, pos, cache, chunk, logits_to_keep=1)

    return read


def run_row(plain: Any, anchored: Any, ids: torch.Tensor, am: torch.Tensor, new_tokens: int, chunk: int,
            window: int = 0) -> dict[str, Any]:
    B, P = ids.shape
    res: dict[str, dict[str, Any]] = {}
    res["plain-dynamic"] = greedy(plain, ids, am, DynamicCache(), new_tokens, one_shot)
    static = StaticCache(config=plain.config, max_batch_size=B, max_cache_len=P + new_tokens)
    res["plain-static"] = greedy(plain, ids, am, static, new_tokens, one_shot)
    res["anchor"] = greedy(anchored, ids, am, anllm.AnchorCache(), new_tokens, chunked(chunk))
    anchored._anllm_attention.fast_decode = False
    try:
        res["anchor-masked"] = greedy(anchored, ids, am, anllm.AnchorCache(), new_tokens, chunked(chunk))
    finally:
        anchored._anllm_attention.fast_decode = True
    reference = greedy(anchored, ids, am, DynamicCache(), new_tokens, one_shot)["tokens"]
    same = torch.equal(res["anchor"]["tokens"], reference) and torch.equal(res["anchor-masked"]["tokens"], reference)
    if window:
        with anchor_options(anchored, window=window):
            res["anchor-window"] = greedy(anchored, ids, am, anllm.AnchorCache(), new_tokens, chunked(chunk))
            same_window = torch.equal(res["anchor-window"]["tokens"],
                                      greedy(anchored, ids, am, DynamicCache(), new_tokens, one_shot)["tokens"])
        if not same_window:
            print(f"{RED}MISMATCH at B={B} P={P}: anllm with window {window} differs from its full cache{RESET}")
        same = same and same_window
    best = {k: min(res["plain-dynamic"][k], res["plain-static"][k]) for k in ("prefill_s", "end_to_end_s", "decode_step_median_s")}
    a = res["anchor"]
    row = {
        "batch": B, "prompt_tokens": P, "real_prompt_tokens": int(am.sum()), "new_tokens": new_tokens,
        "prefill_chunk_size": chunk, "identical_tokens": same,
        "decode_speedup_vs_best_full": best["decode_step_median_s"] / a["decode_step_median_s"],
        "prefill_speedup_vs_best_full": best["prefill_s"] / a["prefill_s"],
        "end_to_end_speedup_vs_best_full": best["end_to_end_s"] / a["end_to_end_s"],
        "fast_decode_speedup": res["anchor-masked"]["decode_step_median_s"] / a["decode_step_median_s"],
        "best_full": {k: min(("plain-dynamic", "plain-static"), key=lambda n: res[n][k]) for k in best},
    }
    if window:
        w = res["anchor-window"]
        row.update(window=window, window_decode_over_anchor=a["decode_step_median_s"] / w["decode_step_median_s"],
                   window_decode_speedup_vs_best_full=best["decode_step_median_s"] / w["decode_step_median_s"])
    for name, r in res.items():
        row[name] = {k: v for k, v in r.items() if k != "tokens"}
    if not same:
        first = int((res["anchor"]["tokens"] != reference).any(0).nonzero()[0])
        row["first_mismatch_step"] = first
        print(f"{RED}MISMATCH at B={B} P={P}: anllm differs from the anchor-aware full cache at step {first}{RESET}")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", nargs="+", default=DEFAULT_GRID, help="BATCHxTOKENS entries")
    p.add_argument("--prompts", nargs="+", default=["equal", "ragged"], choices=["equal", "ragged"])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--chunk", type=int, default=DEFAULT_PREFILL_CHUNK)
    p.add_argument("--window", type=int, default=128, help="the anchor-window candidate's window (0: leave it out)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench_generate")
    args = p.parse_args()
    if args.window < 0:
        p.error(f"--window must be >= 0 (0 leaves the window candidate out), got {args.window}")
    setup_threads(args.threads)
    machine = machine_info()
    plain, tok = load_smollm2()
    anchored, _ = load_smollm2()
    anllm.prepare_model(anchored, tok, mode="ep")
    longest = max(int(g.split("x")[0]) * int(g.split("x")[1]) for g in args.grid)
    ids = tok(prose(int(5 * longest * 1.3) + 10_000), return_tensors="pt").input_ids[0]
    greedy(anchored, *make_prompts(ids, 1, 128, False), anllm.AnchorCache(), 4, chunked(args.chunk))  # warm-up
    greedy(plain, *make_prompts(ids, 1, 128, False), DynamicCache(), 4, one_shot)
    results, table = [], []
    for kind in args.prompts:
        for g in args.grid:
            B, L = (int(x) for x in g.split("x"))
            row = {"model": "smollm2-135m (EP)", "prompts": kind, **run_row(plain, anchored, *make_prompts(ids, B, L, kind == "ragged"),
                                                                          args.new_tokens, args.chunk, args.window)}
            results.append(row)
            table.append([kind, B, L, row["plain-dynamic"]["prefill_s"], row["plain-static"]["prefill_s"], row["anchor"]["prefill_s"],
                          row["plain-dynamic"]["decode_tokens_per_s"], row["plain-static"]["decode_tokens_per_s"],
                          row["anchor"]["decode_tokens_per_s"], row["prefill_speedup_vs_best_full"],
                          row["decode_speedup_vs_best_full"], row["end_to_end_speedup_vs_best_full"],
                          row["fast_decode_speedup"], row.get("window_decode_over_anchor", float("nan")),
                          "yes" if row["identical_tokens"] else "NO"])
            print(f"{kind} {B}x{L}: prefill x{row['prefill_speedup_vs_best_full']:.2f} decode x{row['decode_speedup_vs_best_full']:.2f} "
                  f"e2e x{row['end_to_end_speedup_vs_best_full']:.2f} window/anchor decode "
                  f"x{row.get('window_decode_over_anchor', float('nan')):.2f} same tokens {row['identical_tokens']}", flush=True)
            write_results(args.out, machine, {"settings": vars(args), "results": results})  # after every row
    print_table(
        f"SmolLM2-135M, {args.new_tokens} new tokens, {torch.get_num_threads()} threads: plain model (dynamic / static "
        "cache) vs anllm (AnchorCache, chunked prefill); speed-ups against the faster plain cache per metric",
        ["prompts", "B", "L", "prefill s dyn", "prefill s static", "prefill s anchor", "tok/s dyn", "tok/s static",
         "tok/s anchor", "prefill ×", "decode ×", "end-to-end ×", "no-mask decode ×", f"window {args.window} / anchor decode",
         "same tokens"],
        table,
    )


if __name__ == "__main__":
    main()
