"""The GPU checks in one command (about 5-10 minutes on one GPU; exits 0 with a note without CUDA).

    python bench/gpu_check.py [--model DIR] [--quick]

1. Training step (forward + backward, bf16) at 4k and 8k tokens: plain causal attention (SDPA
   ``is_causal``; ``flash_attention_2`` too when installed), AnSAN with SDPA's dense mask, AnSAN with a
   flex_attention BlockMask (built from the same rule).
2. Exactness in bf16: greedy tokens of AnchorCache vs a full DynamicCache on the anchor-aware model
   (left-padded batch); reported as the share of identical tokens and the first differing step
   (bf16 sums keys in a different order when the cache is pruned, so a near-tie may flip).
3. Decode tokens/s at batch 1, 8 and 32 (4k prompt): the plain model with a DynamicCache vs anllm
   with an AnchorCache (chunked prefill).

No model download happens on the GPU box: ``--model`` takes a local checkpoint; without it a
SmolLM2-135M-*shaped* Llama with random weights is used (speed and exactness do not need trained
weights) with an anchor every ~25 tokens. Results: ``bench/results/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_results

import anllm
from anllm.anchors import AnchorConfig

ANCHOR = 13  # token id used as the EP anchor of the random model
DEVICE = "cuda"  # --cpu-smoke runs the same code on the CPU (tiny sizes) to test the script itself
DTYPE = torch.bfloat16


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def smollm2_shaped(attn: str, dtype: torch.dtype, path: str | None) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if path:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype)
    else:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=16384,
                          tie_word_embeddings=True, rope_theta=100000.0, attn_implementation=attn)
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config.anllm = AnchorConfig(mode="ep", anchor_token_ids=[ANCHOR]).to_dict()
    return model.to(DEVICE)


def token_ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 49000, (batch, length), generator=g)
    ids[:, torch.arange(24, length, 25)] = ANCHOR
    return ids.to(DEVICE)


def timed(fn: Callable[[], Any], warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_steps(args: argparse.Namespace) -> list[dict[str, Any]]:
    import importlib.util

    rows = []
    backends = [("causal", "sdpa"), ("ansan", "sdpa"), ("ansan", "flex_attention")]
    if importlib.util.find_spec("flash_attn") is not None:
        backends.insert(1, ("causal", "flash_attention_2"))
    for L in args.lengths:
        ids = token_ids(1, L)
        for rule, attn in backends:
            model = smollm2_shaped(attn, DTYPE, args.model)
            if rule == "ansan":
                anllm.prepare_model(model, None)
            model.train()

            def step() -> None:
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                model.zero_grad(set_to_none=True)

            try:
                t = timed(step, warmup=2, repeat=args.repeat)
                rows.append({"length": L, "rule": rule, "attn_implementation": attn, "s_per_step": t, "tokens_per_s": L / t,
                             "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None})
            except Exception as e:  # a backend that fails is a result too
                rows.append({"length": L, "rule": rule, "attn_implementation": attn, "error": f"{type(e).__name__}: {e}"[:300]})
            print(rows[-1], flush=True)
            del model
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return rows


@torch.inference_mode()
def greedy(model: Any, ids: torch.Tensor, am: torch.Tensor, cache: Any, new: int, chunk: int | None) -> tuple[torch.Tensor, list[float]]:
    from anllm.eval.generation import prefill

    pos = (am.cumsum(-1) - 1).clamp_min(0)
    out = prefill(model, ids, am, pos, cache, chunk, logits_to_keep=1)
    nxt, toks, steps, next_pos = out.logits[:, -1].argmax(-1), [], [], am.sum(-1)
    for _ in range(new):
        toks.append(nxt)
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=nxt[:, None], attention_mask=am, position_ids=next_pos[:, None], past_key_values=cache,
                    use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
        sync()
        steps.append(time.perf_counter() - t0)
        next_pos = next_pos + 1
    return torch.stack(toks, 1), steps


def exactness(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import DynamicCache

    model = smollm2_shaped("sdpa", DTYPE, args.model)
    anllm.prepare_model(model, None)
    model.eval()
    ids = token_ids(4, args.exact_prompt, seed=1)
    am = torch.ones_like(ids)
    am[1, : args.exact_prompt // 10], am[3, : args.exact_prompt // 3] = 0, 0
    a, _ = greedy(model, ids, am, anllm.AnchorCache(), 64, 256)
    f, _ = greedy(model, ids, am, DynamicCache(), 64, None)
    diff = (a != f).any(0).nonzero()
    return {"dtype": str(DTYPE), "batch": 4, "prompt": args.exact_prompt, "new_tokens": 64,
            "identical_share": float((a == f).float().mean()), "identical_all": bool(torch.equal(a, f)),
            "first_differing_step": int(diff[0]) if len(diff) else None}


def decode(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import DynamicCache

    plain = smollm2_shaped("sdpa", DTYPE, args.model).eval()
    anchored = smollm2_shaped("sdpa", DTYPE, args.model).eval()
    anllm.prepare_model(anchored, None)
    rows = []
    for B in args.batches:
        ids = token_ids(B, args.prompt, seed=2)
        am = torch.ones_like(ids)
        row: dict[str, Any] = {"batch": B, "prompt": args.prompt, "new_tokens": args.new_tokens}
        for name, model, cache, chunk in (("plain-dynamic", plain, DynamicCache, None), ("anchor", anchored, anllm.AnchorCache, 256)):
            try:
                greedy(model, ids[:, :256], am[:, :256], cache(), 4, chunk)  # warm-up
                _, steps = greedy(model, ids, am, cache(), args.new_tokens, chunk)
                row[f"{name}_tokens_per_s"] = B / statistics.median(steps)
            except torch.cuda.OutOfMemoryError as e:
                row[f"{name}_error"] = f"OOM: {e}"[:200]
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        if "anchor_tokens_per_s" in row and "plain-dynamic_tokens_per_s" in row:
            row["decode_speedup"] = row["anchor_tokens_per_s"] / row["plain-dynamic_tokens_per_s"]
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a local HF checkpoint (default: random SmolLM2-135M-shaped Llama)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--exact-prompt", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of the script itself")
    p.add_argument("--cpu-smoke", action="store_true", help="run the same code on the CPU in fp32 at tiny sizes "
                   "(tests the script, not the GPU; flex may fail on CPU and is then reported as an error row)")
    p.add_argument("--out", default="gpu_check")
    args = p.parse_args()
    global DEVICE, DTYPE
    if args.cpu_smoke:
        DEVICE, DTYPE, args.quick = "cpu", torch.float32, True
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run it on a GPU machine).")
        return
    if args.quick:
        args.lengths, args.batches, args.prompt, args.new_tokens, args.repeat = [256], [1, 2], 256, 8, 2
        args.exact_prompt = 256
    machine = machine_info()
    t0 = time.perf_counter()
    result = {"settings": vars(args), "train_step": train_steps(args), "exactness_bf16": exactness(args),
              "decode": decode(args)}
    result["wall_s"] = time.perf_counter() - t0
    write_results(args.out, machine, result)


if __name__ == "__main__":
    main()
