"""Training step with the AnSAN mask vs plain causal attention (same model, length, batch, SDPA).

One step = forward + backward (+ AdamW step with ``--adamw``). The AnSAN step includes building the
mask in the model's forward hook (what training really pays). Candidates, interleaved in one
process on the same weights and inputs:

* ``causal``: the hook switched off (``anllm.anchor_attention(model, enabled=False)``): transformers'
  own causal path (SDPA ``is_causal``, no mask tensor);
* ``ansan``: the prepared model as used in training (dense bool ``[B, 1, L, L]`` mask into SDPA);
* ``causal, dense 4D mask`` (reference): a ready causal bool mask passed in, to separate the cost of a
  dense mask in SDPA from the cost of the AnSAN rule.

Models: a scaled-up tiny Llama (random weights) and SmolLM2-135M (EP anchors on real prose).

The number to watch is the **mask's share of an AnSAN step** (building the dense mask from the token
ids in the hook, over the step's time) at 1k/4k/8k tokens: the rule itself should cost little next
to the model; what a dense mask costs inside SDPA is shown separately (the kernel column).

    .venv/bin/python bench/bench_train_step.py                       # L=1k/4k/8k, tiny + SmolLM2 (<= 4k)
    .venv/bin/python bench/bench_train_step.py --lengths 1024 2048 --repeat 5 --adamw
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    load_smollm2,
    machine_info,
    median,
    print_table,
    prose,
    setup_threads,
    time_side_by_side,
    write_results,
)

import anllm
from anllm.anchors import AnchorConfig

TINY_ANCHOR_ID = 5


def tiny_model(vocab: int, attn: str) -> tuple[Any, Callable[[int], torch.Tensor]]:
    """Scaled-up tiny Llama (hidden 256, 4 layers) with random ids and an anchor every ~25 tokens."""
    from anllm.models.tiny import tiny_llama

    model = tiny_llama(
        vocab_size=vocab,
        hidden_size=256,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        max_position_embeddings=8192,
        attn_implementation=attn,
    )
    model.config.anllm = AnchorConfig(mode="ep", anchor_token_ids=[TINY_ANCHOR_ID]).to_dict()
    anllm.prepare_model(model, None)

    def batch(length: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(10, vocab, (1, length), generator=g)
        ids[0, torch.arange(24, length, 25)] = TINY_ANCHOR_ID
        return ids

    return model, batch


def smollm2_model(attn: str) -> tuple[Any, Callable[[int], torch.Tensor]]:
    """SmolLM2-135M in EP mode (sentence-ending punctuation = anchors) on Gutenberg prose."""
    model, tok = load_smollm2(attn)
    anllm.prepare_model(model, tok, mode="ep")
    ids_all = tok(prose(60_000), return_tensors="pt").input_ids

    def batch(length: int) -> torch.Tensor:
        if ids_all.shape[1] < length:
            raise SystemExit(f"need {length} tokens of prose, have {ids_all.shape[1]}")
        return ids_all[:, :length].clone()

    return model, batch


def step_fn(
    model: Any, ids: torch.Tensor, mode: str, opt: torch.optim.Optimizer | None
) -> Callable[[], None]:
    causal_4d = torch.ones(
        (ids.shape[0], 1, ids.shape[1], ids.shape[1]), dtype=torch.bool, device=ids.device
    ).tril_()

    def run() -> None:
        if mode == "ansan":
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            with anllm.anchor_attention(model, enabled=False):
                am = causal_4d if mode == "causal_4d" else None
                loss = model(input_ids=ids, attention_mask=am, labels=ids, use_cache=False).loss
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
        if ids.is_cuda:
            torch.cuda.synchronize()

    return run


def mask_build_ms(model: Any, ids: torch.Tensor, repeat: int) -> float:
    """Time of the hook alone (ids -> dense mask), to explain the gap."""
    hook = model._anllm_attention
    am = torch.ones_like(ids)
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": am, "use_cache": False}
    times = time_side_by_side({"mask": lambda: hook._pre_forward(model, (), dict(kw))}, 1, repeat)
    return 1e3 * median(times["mask"])


def attention_kernel_s(model: Any, ids: torch.Tensor, repeat: int) -> dict[str, float]:
    """SDPA forward+backward alone, summed over the model's layers, with ``is_causal`` (what plain
    causal training uses) vs the AnSAN mask: the part of the gap that is the kernel path (a dense
    mask forgoes the causal kernel's skipping of the upper triangle), not the rule."""
    import torch.nn.functional as F

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    B, L = ids.shape
    g = torch.Generator(device=ids.device).manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=ids.device).requires_grad_()

    q, k, v = t(B, heads, L, dim), t(B, kv, L, dim), t(B, kv, L, dim)
    hook = model._anllm_attention
    kw: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "use_cache": False,
    }
    mask = hook._pre_forward(model, (), kw)[1]["attention_mask"]

    def run(**extra: Any) -> Callable[[], None]:
        def go() -> None:
            F.scaled_dot_product_attention(
                q, k, v, enable_gqa=kv != heads, **extra
            ).sum().backward()

        return go

    times = time_side_by_side(
        {"is_causal": run(is_causal=True), "ansan": run(attn_mask=mask)}, 1, repeat
    )
    layers = cfg.num_hidden_layers
    return {name: layers * median(ts) for name, ts in times.items()}


def _kernel_cell(kernel: dict[str, float], mode: str, step_s: float) -> str:
    key = {"causal": "is_causal", "ansan": "ansan"}.get(mode)
    if key is None or key not in kernel:
        return ""
    return f"{kernel[key]:.2f} ({100 * kernel[key] / step_s:.0f}%)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--smollm2-max-length", type=int, default=4096,
                   help="longer SmolLM2 steps are skipped (fwd+bwd at 8k needs more memory than a 24 GB CPU box)")
    p.add_argument("--tiny-vocab", type=int, default=8192)
    p.add_argument(
        "--adamw", action="store_true", help="include an AdamW step (lr 0: weights stay put)"
    )
    p.add_argument(
        "--reference-models",
        nargs="*",
        default=["tiny"],
        choices=["tiny", "smollm2"],
        help="models that also run the 'causal, dense 4D mask' reference (SmolLM2 steps are slow)",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    setup_threads(args.threads)
    machine = machine_info()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    # flex_attention runs the AnSAN rule as a BlockMask (skips fully masked blocks); its compiled
    # kernel is a GPU path, so on CPU we measure SDPA only.
    attns = ["sdpa", "flex_attention"] if gpu else ["sdpa"]
    if not gpu:
        print("no GPU: flex not measured")

    results, rows = [], []
    for name, attn in [(m, a) for m in args.models for a in attns]:
        model, make = tiny_model(args.tiny_vocab, attn) if name == "tiny" else smollm2_model(attn)
        model.to(device).train()
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=0.0) if args.adamw else None
        for L in args.lengths:
            if name == "smollm2" and L > args.smollm2_max_length and not gpu:
                print(f"skip smollm2 L={L} (> --smollm2-max-length {args.smollm2_max_length})")
                continue
            ids = make(L).to(device)
            n_anchor = int(torch.isin(ids, model._anllm_attention.anchor_ids.to(ids.device)).sum())
            reference = name in args.reference_models and attn == "sdpa"
            modes = ["causal", "ansan"] + (["causal_4d"] if reference else [])
            times = time_side_by_side(
                {m: step_fn(model, ids, m, opt) for m in modes}, args.warmup, args.repeat
            )
            t_causal = median(times["causal"])
            mask_ms = mask_build_ms(model, ids, max(3, args.repeat))
            kernel = attention_kernel_s(model, ids, max(3, args.repeat)) if attn == "sdpa" else {}
            for m in modes:
                t = median(times[m])
                tps = ids.numel() / t
                results.append(
                    {
                        "model": name,
                        "attn_implementation": attn,
                        "device": str(device),
                        "params": n_params,
                        "length": L,
                        "batch": 1,
                        "anchors": n_anchor,
                        "mode": m,
                        "median_s": t,
                        "times_s": times[m],
                        "tokens_per_s": tps,
                        "ratio_vs_causal": t_causal / t,
                        "mask_build_ms": mask_ms if m == "ansan" else None,
                        "mask_share_of_step": mask_ms / 1e3 / t if m == "ansan" else None,
                        "sdpa_fwd_bwd_all_layers_s": kernel.get(
                            "ansan" if m == "ansan" else "is_causal"
                        )
                        if m != "causal_4d"
                        else None,
                        "adamw": args.adamw,
                    }
                )
                rows.append(
                    [
                        name,
                        attn,
                        L,
                        n_anchor,
                        m,
                        t,
                        tps,
                        t_causal / t,
                        f"{mask_ms:.1f} ({100 * mask_ms / 1e3 / t:.1f}%)" if m == "ansan" else "",
                        _kernel_cell(kernel, m, t),
                    ]
                )
            print(
                f"{name} ({attn}) L={L}: ansan/causal = {t_causal / median(times['ansan']):.3f}, "
                f"mask share {100 * mask_ms / 1e3 / median(times['ansan']):.1f}%",
                flush=True,
            )
        del model, opt

    print_table(
        f"Training step (fwd+bwd{' + AdamW' if args.adamw else ''}), batch 1, {device.type} "
        f"(median of {args.repeat}, {torch.get_num_threads()} threads)",
        [
            "model",
            "backend",
            "L",
            "anchors",
            "attention",
            "s/step",
            "tokens/s",
            "× causal speed",
            "mask build ms (share of step)",
            "SDPA fwd+bwd s (share)",
        ],
        rows,
    )
    print(
        "SDPA fwd+bwd = the attention kernel alone over all layers (random q/k/v of the model's shape): "
        "is_causal for 'causal', the AnSAN mask for 'ansan'."
    )
    write_results(
        "bench_train_step",
        machine,
        {
            "settings": vars(args),
            "goal": "the mask's share of an AnSAN training step at 1k/4k/8k (mask_share_of_step); AnSAN/causal tokens/s alongside",
            "flex_attention": "measured (GPU)" if gpu else "no GPU: flex not measured",
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
