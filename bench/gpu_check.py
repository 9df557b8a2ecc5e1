"""Every GPU question in one command and one JSON (about 5-6 minutes on one H100/H200).

    python bench/gpu_check.py --out /some/dir/gpu_check.json      # on the GPU node (see bench/gpu_check.sh)
    python bench/gpu_check.py --cpu-smoke --out /tmp/x.json        # the same code on CPU, tiny sizes (tests)

Sections, in this fixed priority order (a section, or a row inside one, that would start after
``--budget-s`` seconds is recorded as skipped, so the run always ends with its JSON; the JSON is
rewritten after every section, so a killed run still leaves everything measured so far):

1. ``exactness``: bf16 greedy tokens of AnchorCache vs a full DynamicCache on the anchor-aware model
   (left-padded batch 4): share of identical tokens and the first differing step (bf16 sums keys in
   a different order when the cache is pruned, so a near-tie may flip).
2. ``decode:smollm2``: decode tokens/s at batch 1/8/32 with a 4k prompt: the plain model (anchors
   off) with a ``DynamicCache`` and with a ``StaticCache`` (its strongest cache) vs anllm with an
   ``AnchorCache`` (chunked prefill); plus ``host_syncs_per_decode_step`` (batch 1 and 8): how often
   the host reads the device during an anchor-cache decode step (a measurement, not an assertion).
3. ``train:smollm2``: forward + backward (no optimizer) at 4k and 8k tokens: causal SDPA
   (``flash_attention_2`` too when installed), AnSAN with SDPA's dense mask, AnSAN with a
   flex_attention BlockMask (``--causal-flex``: causal flex too); seconds/step, tokens/s, MFU, peak
   memory, and the time ratios.
4. ``train:llama2-7b``: the same on a Llama-2-7B-shaped model with gradient checkpointing.
5. ``decode:llama2-7b``: the decode rows on the 7B shape, ONE model (anchors toggled with
   ``anllm.anchor_attention``, never two copies); an OOM is recorded per row and candidate.
6. ``vocab:llama2-7b``: what ``model.pad_vocab_multiple`` buys: the output projection + cross-entropy,
   forward and backward, over 8k tokens at hidden 4096 for 32,000 rows (Llama-2), 32,001 (+ ``<AC>``)
   and 32,064 (padded to a multiple of 64); ``padded_speedup`` = time(32,001) / time(32,064).

Models: ``--shape smollm2`` (random SmolLM2-135M-shaped Llama), ``--shape llama2-7b`` (random
Llama-2-7B-shaped: vocab 32000, hidden 4096, 32 layers, 32 heads, intermediate 11008), default
both; or ``--model DIR``, a local checkpoint (no download happens on the GPU box). Input ids are drawn
from the model's own vocabulary, ``[min(100, V // 10), V - 1)``. Anchors: a checkpoint keeps its
saved anchor settings (``config.anllm``) and its anchor ids are planted every 25 tokens; a plain
checkpoint with a tokenizer gets EP anchors on "."; only a random model gets a made-up anchor id
(``min(100, V // 10) - 1``, inside its vocabulary and outside the drawn range).

MFU = model FLOPs per second / the GPU's peak dense bf16 FLOP/s (989e12 for H100 and H200; None for
other GPUs and on CPU). Model FLOPs of one training step (forward + backward) over ``B x L`` tokens:

    6 * N * B * L  +  12 * layers * (heads * head_dim) * B * L**2 / 2

with N the parameters used in matmuls (all parameters less an untied input embedding) and the
attention term halved for causal attention; AnSAN rows use the same (causal) count, so their MFU
compares time at equal work, and the recomputation of gradient checkpointing is not counted.

``--cpu-smoke`` runs the same code on the CPU in fp32 at tiny sizes (both shapes scaled down to 2
layers, the 7B one keeping its 32000-token vocabulary) to test the script, not the hardware;
flex_attention rows are recorded as skipped there (torch has no flex backward on CPU).
Without CUDA and without ``--cpu-smoke`` the script prints a note and exits 0.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # the budget counts imports and model construction too

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, print_table, write_results  # noqa: E402

import anllm  # noqa: E402
from anllm.anchors import AnchorConfig  # noqa: E402
from anllm.eval.generation import prefill  # noqa: E402
from anllm.modeling import anchor_options, attention_backend  # noqa: E402
from anllm.testing import count_host_reads  # noqa: E402
from anllm.train.distill import distill_kl  # noqa: E402  (needs omegaconf: carried in .whl)

DEVICE = "cuda"  # --cpu-smoke: "cpu"
DTYPE = torch.bfloat16  # --cpu-smoke: float32
ANCHOR_EVERY = 25
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 (no sparsity), SXM

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=16384,
                    tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384,
                      tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5),
}
SMOKE_SHAPES: dict[str, dict[str, Any]] = {  # the same vocabularies, two small layers
    "smollm2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2),
    "llama2-7b": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4),
}
GRAD_CKPT = {"smollm2": False, "llama2-7b": True}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    if DEVICE == "cuda":  # (on the CPU a full collection costs more than the tiny tensors it frees)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mem_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None


def error_text(e: BaseException) -> str:
    oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
    return ("OOM: " if oom else "") + f"{type(e).__name__}: {e}"[:400]


class Budget:
    """Seconds since the script started, against ``--budget-s``: what would start later is skipped."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - T_START

    def over(self) -> bool:
        return self.elapsed() >= self.seconds

    def skip_record(self) -> dict[str, Any]:
        return {"status": "skipped", "reason": f"time budget: {self.elapsed():.0f} s used of --budget-s {self.seconds:.0f}"}


# --- models ----------------------------------------------------------------------------------------


@dataclass
class Bench:
    """A model under test plus what the benchmark needs to feed it."""

    name: str
    model: Any
    vocab_size: int
    anchor_ids: list[int]
    info: dict[str, Any]
    grad_ckpt: bool
    lo: int = 0
    hi: int = 0
    filler: int = 0
    max_input_id: int = -1
    anchor_ids_planted: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        V = self.vocab_size
        self.lo, self.hi = min(100, V // 10), V - 1
        anchors = set(self.anchor_ids)
        self.filler = next(i for i in range(self.lo, self.hi) if i not in anchors)

    def token_ids(self, batch: int, length: int, seed: int = 0) -> torch.Tensor:
        """Random ids from this model's vocabulary (no special ids), an anchor every 25 tokens."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(self.lo, self.hi, (batch, length), generator=g)
        anchors = torch.tensor(self.anchor_ids, dtype=torch.long)
        ids[torch.isin(ids, anchors)] = self.filler  # exactly one anchor per 25 tokens
        cols = torch.arange(ANCHOR_EVERY - 1, length, ANCHOR_EVERY)
        ids[:, cols] = anchors[torch.arange(len(cols)) % len(anchors)]
        self.max_input_id = max(self.max_input_id, int(ids.max()))
        self.anchor_ids_planted.update(int(a) for a in anchors[: len(cols)].tolist())
        return ids.to(DEVICE)

    def describe(self) -> dict[str, Any]:
        return {**self.info, "vocab_size": self.vocab_size, "anchor_ids": self.anchor_ids,
                "anchor_ids_planted": sorted(self.anchor_ids_planted), "input_id_range": [self.lo, self.hi],
                "max_input_id": self.max_input_id, "gradient_checkpointing": self.grad_ckpt}


def random_llama(shape: str, smoke: bool) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {**SHAPES[shape], **(SMOKE_SHAPES[shape] if smoke else {})}
    cfg = LlamaConfig(**kw, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)  # build in place on the device, in the target dtype (a 7B in seconds)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(before)
    return model  # (no .to(dtype): RoPE's inv_freq stays fp32, as from_pretrained leaves it)


def load_checkpoint(path: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": DTYPE}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, device_map=DEVICE, **kw)
    except (ImportError, ValueError):  # no accelerate: load, then move
        model = AutoModelForCausalLM.from_pretrained(path, **kw).to(DEVICE)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - a weights-only checkpoint
        tokenizer = None
    return model, tokenizer


def make_anchor_aware(model: Any, tokenizer: Any, random_weights: bool) -> tuple[list[int], str]:
    """Anchor ids and where they come from; the model is prepared (AnSAN on) afterwards."""
    from anllm.modeling import AnchorAttention

    V = model.config.vocab_size
    saved = anllm.get_anchor_config(model)
    if saved is not None and saved.enabled:
        if saved.mode == "ac" and tokenizer is None:  # prepare_model checks <AC> against the tokenizer
            model._anllm_attention = AnchorAttention(model, saved)
        else:
            anllm.prepare_model(model, tokenizer)
        return list(saved.anchor_token_ids), "checkpoint config.anllm"
    if not random_weights and tokenizer is not None:
        try:
            anllm.prepare_model(model, tokenizer, "ep", ep_tokens=["."])
            return list(anllm.get_anchor_config(model).anchor_token_ids), "EP on '.' of the checkpoint's tokenizer"
        except ValueError:
            pass
    made_up = min(100, V // 10) - 1  # inside the vocabulary, outside the range ids are drawn from
    model.config.anllm = AnchorConfig(mode="ep", anchor_token_ids=[made_up]).to_dict()
    anllm.prepare_model(model, None)
    return [made_up], "made up (random model)" if random_weights else "made up (no anchor settings, no tokenizer)"


def build(name: str, args: argparse.Namespace) -> Bench:
    t0 = time.perf_counter()
    if name == "model":
        model, tokenizer = load_checkpoint(args.model)
        source, random_weights = f"checkpoint {args.model}", False
    else:
        model, tokenizer = random_llama(name, args.cpu_smoke), None
        source = f"random {name}-shaped Llama" + (" (scaled down for --cpu-smoke)" if args.cpu_smoke else "")
        random_weights = True
    anchor_ids, anchor_source = make_anchor_aware(model, tokenizer, random_weights)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    if name == "model":
        grad_ckpt = {"on": True, "off": False}.get(args.grad_ckpt, n_params >= 1e9)
    else:
        grad_ckpt = {"on": True, "off": False}.get(args.grad_ckpt, GRAD_CKPT[name])
    info = {"source": source, "params": n_params, "matmul_params": matmul_params(model),
            "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
            "kv_heads": getattr(cfg, "num_key_value_heads", None), "dtype": str(DTYPE),
            "anchor_source": anchor_source, "anchor_config": cfg.anllm, "build_s": time.perf_counter() - t0}
    vocab = min(cfg.vocab_size, model.get_input_embeddings().num_embeddings)
    bench = Bench(name, model, vocab, anchor_ids, info, grad_ckpt)
    print(f"[{name}] built in {info['build_s']:.1f} s: {n_params / 1e6:.1f}M params, vocab {vocab}, "
          f"anchors {anchor_ids[:8]}{'...' if len(anchor_ids) > 8 else ''} ({anchor_source})", flush=True)
    return bench


def matmul_params(model: Any) -> int:
    """Parameters used in matmuls: all, less an input embedding that is not tied to the LM head."""
    total = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    return total if tied else total - emb.weight.numel()


def gpu_peak_flops() -> float | None:
    if DEVICE != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def train_flops(b: Bench, batch: int, length: int) -> float:
    """Model FLOPs of one forward + backward (see the module docstring)."""
    cfg = b.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn_width = cfg.num_attention_heads * head_dim
    return (6 * b.info["matmul_params"] * batch * length
            + 12 * cfg.num_hidden_layers * attn_width * batch * length**2 / 2)


# --- timing ----------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], warmup: int, repeat: int, max_s: float, budget: Budget) -> dict[str, Any]:
    """Median seconds of up to ``repeat`` calls after ``warmup`` (the first call's time is kept: it
    includes compilation); fewer repeats when a call is slow (``max_s`` per row) or the budget is spent."""
    first = None
    for i in range(max(1, warmup)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i == 0:
            first = time.perf_counter() - t0
    times: list[float] = []
    row_start = time.perf_counter()
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - row_start + times[-1] > max_s or budget.over():
            break
    return {"s_per_step": statistics.median(times), "timed_steps": len(times), "first_step_s": first}


# --- sections --------------------------------------------------------------------------------------


def section_train(b: Bench, args: argparse.Namespace, budget: Budget, record: dict[str, Any]) -> None:
    big = b.name != "smollm2"
    lengths = args.train_lengths_7b if b.name == "llama2-7b" else args.train_lengths
    backends = [("causal", "sdpa"), ("ansan", "sdpa"), ("ansan+window64", "sdpa"), ("ansan+distill", "sdpa"),
                ("ansan", "flex_attention")]
    if args.causal_flex:  # flex's own cost apart from the rule's (each flex mask compiles: ~0.5 min more per row)
        backends.insert(2, ("causal", "flex_attention"))
    if DEVICE == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        backends.insert(1, ("causal", "flash_attention_2"))
    model = b.model
    if b.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    peak = gpu_peak_flops()
    rows: list[dict[str, Any]] = []
    record["rows"] = rows  # filled in place: a killed run still writes the rows measured so far
    try:
        for L in lengths:
            ids = b.token_ids(1, L)
            for rule, attn in backends:
                row: dict[str, Any] = {"length": L, "batch": 1, "rule": rule, "attn_implementation": attn,
                                       "gradient_checkpointing": b.grad_ckpt}
                rows.append(row)
                if budget.over():
                    row.update(budget.skip_record())
                    continue
                if attn == "flex_attention" and DEVICE == "cpu":
                    row.update(status="skipped", reason="flex_attention has no backward on CPU (GPU rows only)")
                    continue
                free_memory()

                def step() -> None:
                    try:
                        out = model(input_ids=ids, labels=ids, use_cache=False)
                        loss = out.loss
                        if rule == "ansan+distill":  # + a full-attention teacher forward and the KL (trainer.distill)
                            with torch.no_grad(), anllm.anchor_attention(model, enabled=False):
                                teacher = model(input_ids=ids, use_cache=False).logits
                            loss = 0.5 * loss + 0.5 * distill_kl(out.logits, teacher, ids, 1.0)
                        loss.backward()
                    finally:
                        model.zero_grad(set_to_none=True)

                window = {"window": 64} if rule == "ansan+window64" else {}
                try:
                    with attention_backend(model, attn), anllm.anchor_attention(model, enabled=rule != "causal"), \
                            anchor_options(model, **window):
                        t = timed(step, args.train_warmup, args.repeat, 60.0 if big else 30.0, budget)
                    flops = train_flops(b, 1, L)
                    row.update(status="ok", **t, tokens_per_s=L / t["s_per_step"], model_flops_per_step=flops,
                               mfu=flops / t["s_per_step"] / peak if peak else None, peak_mem_gib=peak_mem_gib())
                except Exception as e:  # noqa: BLE001 - a backend that fails (or OOMs) is a result too
                    row.update(status="error", error=error_text(e))
                print(f"[train:{b.name}] {row}", flush=True)
                free_memory()
    finally:
        model.zero_grad(set_to_none=True)
        if b.grad_ckpt:
            model.gradient_checkpointing_disable()
        model.eval()
    by = {(r["length"], r["rule"], r["attn_implementation"]): r for r in rows}
    compare = []
    for L in lengths:
        t = {(rule, attn): by.get((L, rule, attn), {}).get("s_per_step") for rule, attn in backends}
        ref, dense, flex, cflex = (t[("causal", "sdpa")], t[("ansan", "sdpa")], t[("ansan", "flex_attention")],
                                   t.get(("causal", "flex_attention")))
        win, dist = t.get(("ansan+window64", "sdpa")), t.get(("ansan+distill", "sdpa"))
        compare.append({"length": L, "ansan_dense_over_causal": dense / ref if dense and ref else None,
                        "window64_over_ansan": win / dense if win and dense else None,
                        "distill_over_ansan": dist / dense if dist and dense else None,
                        "ansan_flex_over_causal": flex / ref if flex and ref else None,
                        "ansan_flex_over_dense": flex / dense if flex and dense else None,
                        "ansan_flex_over_causal_flex": flex / cflex if flex and cflex else None})
    record.update(status="ok", time_ratios=compare)


@torch.inference_mode()
def greedy(model: Any, ids: torch.Tensor, am: torch.Tensor, cache: Any, new: int, chunk: int | None
           ) -> tuple[torch.Tensor, list[float], float]:
    """Greedy decode: prefill (chunked when ``chunk``, else one forward with explicit cache positions,
    which a StaticCache needs), then ``new`` single-token steps; returns tokens, step seconds, prefill s."""
    B, P = ids.shape
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    sync()
    t0 = time.perf_counter()
    if chunk:
        out = prefill(model, ids, am, pos, cache, chunk, logits_to_keep=1)
    else:
        out = model(input_ids=ids, attention_mask=am, position_ids=pos, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(P, device=ids.device), logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1)
    sync()
    prefill_s = time.perf_counter() - t0
    cache_pos = torch.arange(P, P + new, device=ids.device)
    am = torch.cat([am, torch.ones((B, new), dtype=am.dtype, device=am.device)], 1)
    next_pos = am[:, :P].sum(-1)
    toks, steps = [], []
    for i in range(new):
        toks.append(nxt)
        extra = {} if chunk else {"cache_position": cache_pos[i : i + 1]}
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=nxt[:, None], attention_mask=am[:, : P + i + 1], position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True, **extra)
        nxt = out.logits[:, -1].argmax(-1)
        sync()
        steps.append(time.perf_counter() - t0)
        next_pos = next_pos + 1
    return torch.stack(toks, 1), steps, prefill_s


def section_exactness(b: Bench, args: argparse.Namespace, budget: Budget, record: dict[str, Any]) -> None:
    from transformers import DynamicCache

    P, new = args.exact_prompt, args.exact_new_tokens
    ids = b.token_ids(4, P, seed=1)
    am = torch.ones_like(ids)
    am[1, : P // 10], am[3, : P // 3] = 0, 0
    a, _, _ = greedy(b.model, ids, am, anllm.AnchorCache(), new, args.prefill_chunk)
    f, _, _ = greedy(b.model, ids, am, DynamicCache(), new, None)
    diff = (a != f).any(0).nonzero()
    record.update({"status": "ok", "model": b.name, "dtype": str(DTYPE), "batch": 4, "prompt": P, "new_tokens": new,
            "left_padding": [0, P // 10, 0, P // 3], "identical_share": float((a == f).float().mean()),
            "identical_all": bool(torch.equal(a, f)), "first_differing_step": int(diff[0]) if len(diff) else None})


DECODE_CANDIDATES = ("plain-dynamic", "plain-static", "anchor", "anchor-window64")


def window_of(name: str) -> dict[str, int]:
    """The rule option a decode candidate adds (anchors + a 64-token local window: the window arms)."""
    return {"window": 64} if name == "anchor-window64" else {}


def decode_candidate(b: Bench, name: str, ids: torch.Tensor, am: torch.Tensor, new: int, chunk: int
                     ) -> tuple[Any, int | None, bool]:
    """(cache, prefill chunk, AnSAN on) for one candidate."""
    from transformers import DynamicCache, StaticCache

    if name == "plain-dynamic":
        return DynamicCache(), None, False
    if name == "plain-static":
        return StaticCache(config=b.model.config, max_cache_len=ids.shape[1] + new), None, False
    return anllm.AnchorCache(), chunk, True


def section_decode(b: Bench, args: argparse.Namespace, budget: Budget, record: dict[str, Any]) -> None:
    model, new, P = b.model, args.new_tokens, args.prompt
    rows: list[dict[str, Any]] = []
    record["rows"] = rows
    warm = b.token_ids(1, min(P, 256), seed=3)
    for name in DECODE_CANDIDATES:  # first-call costs (cuBLAS handles, allocator) out of the rows
        try:
            cache, chunk, ansan = decode_candidate(b, name, warm, torch.ones_like(warm), 4, args.prefill_chunk)
            with anllm.anchor_attention(model, enabled=ansan), anchor_options(model, **window_of(name)):
                greedy(model, warm, torch.ones_like(warm), cache, 4, chunk)
        except Exception as e:  # noqa: BLE001 - shows again in the rows
            print(f"[decode:{b.name}] warm-up of {name} failed: {error_text(e)}", flush=True)
        cache = None
        free_memory()
    for B in args.batches:
        row: dict[str, Any] = {"batch": B, "prompt": P, "new_tokens": new}
        rows.append(row)
        if budget.over():
            row.update(budget.skip_record())
            continue
        ids = b.token_ids(B, P, seed=2)
        am = torch.ones_like(ids)
        for name in DECODE_CANDIDATES:
            if budget.over():
                row[name] = budget.skip_record()
                continue
            res: dict[str, Any]
            cache = None
            try:
                cache, chunk, ansan = decode_candidate(b, name, ids, am, new, args.prefill_chunk)
                with anllm.anchor_attention(model, enabled=ansan), anchor_options(model, **window_of(name)):
                    _, steps, prefill_s = greedy(model, ids, am, cache, new, chunk)
                med = statistics.median(steps)
                res = {"status": "ok", "prefill_s": prefill_s, "decode_step_median_s": med,
                       "decode_tokens_per_s": B / med, "end_to_end_s": prefill_s + sum(steps),
                       "peak_mem_gib": peak_mem_gib()}
                if isinstance(cache, anllm.AnchorCache):
                    st = cache.stats()
                    res.update(cache_reduction=st["reduction"], cache_bytes=st["bytes"], kept_tokens=st["kept"],
                               seen_tokens=st["seen"])
            except Exception as e:  # noqa: BLE001 - OOM (or a cache that does not fit the model) is a row
                res = {"status": "error", "error": error_text(e)}
            cache = None  # (a 7B cache at batch 32 x 4k is ~64 GiB: free it before the next candidate)
            row[name] = res
            free_memory()
        tps = {n: row[n].get("decode_tokens_per_s") for n in DECODE_CANDIDATES if isinstance(row.get(n), dict)}
        plain = [v for k, v in tps.items() if k.startswith("plain") and v]
        if tps.get("anchor") and tps.get("plain-dynamic"):
            row["anchor_over_plain_dynamic"] = tps["anchor"] / tps["plain-dynamic"]
        if tps.get("anchor") and plain:
            row["anchor_over_best_plain"] = tps["anchor"] / max(plain)
        if tps.get("anchor-window64") and plain:
            row["window64_over_best_plain"] = tps["anchor-window64"] / max(plain)
        print(f"[decode:{b.name}] {row}", flush=True)
    syncs: dict[str, Any] = {}
    record["host_syncs_per_decode_step"] = syncs
    for B in (1, 8):
        if budget.over():
            syncs[f"batch_{B}"] = budget.skip_record()
            continue
        try:
            syncs[f"batch_{B}"] = count_decode_syncs(b, B, min(P, args.sync_prompt), args.prefill_chunk)
        except Exception as e:  # noqa: BLE001
            syncs[f"batch_{B}"] = {"status": "error", "error": error_text(e)}
        free_memory()
    print(f"[decode:{b.name}] host syncs per decode step: {syncs}", flush=True)
    record["status"] = "ok"


# --- host syncs ------------------------------------------------------------------------------------


def count_decode_syncs(b: Bench, B: int, P: int, chunk: int, steps: int = 4) -> dict[str, Any]:
    """Host reads per decode step of the anchor cache (and of the plain DynamicCache, for reference),
    counted over ``steps`` model calls after a prefill and one decode step."""
    from transformers import DynamicCache

    model = b.model
    ids = b.token_ids(B, P, seed=4)
    out: dict[str, Any] = {"status": "ok", "batch": B, "prompt": P, "steps_counted": steps, "counts": (
        "anllm.testing.count_host_reads on device tensors during model calls: Python-level reads "
        "(item/tolist/__int__/__bool__/nonzero/cpu...) and ATen ops that read a size (x[mask], nonzero, "
        "repeat_interleave...); cuda_sync_events: torch.cuda sync-debug warnings (CUDA only)")}
    for name, cache, ansan in (("anchor", anllm.AnchorCache(), True), ("plain-dynamic", DynamicCache(), False)):
        am = torch.ones_like(ids)
        with torch.inference_mode(), anllm.anchor_attention(model, enabled=ansan):
            pos = (am.cumsum(-1) - 1).clamp_min(0)
            res = prefill(model, ids, am, pos, cache, chunk if ansan else None, logits_to_keep=1)
            nxt, next_pos = res.logits[:, -1].argmax(-1), am.sum(-1)

            def step() -> None:
                nonlocal am, nxt, next_pos
                am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
                o = model(input_ids=nxt[:, None], attention_mask=am, position_ids=next_pos[:, None],
                          past_key_values=cache, use_cache=True)
                nxt, next_pos = o.logits[:, -1].argmax(-1), next_pos + 1

            step()  # the first decode step (a cache that changes shape after the prefill) is not counted
            sync()
            with count_host_reads(DEVICE) as counter:
                for _ in range(steps):
                    step()
        sync()
        counts = dict(counter)
        cuda_events = counts.pop("cuda_sync_events", 0)
        out[name] = {"python_reads_per_step": sum(counts.values()) / steps,
                     "by_kind": {k: v / steps for k, v in sorted(counts.items())},
                     "cuda_sync_events_per_step": cuda_events / steps if DEVICE == "cuda" else None}
    out["host_syncs_per_decode_step"] = out["anchor"]["python_reads_per_step"]
    return out


# --- vocabulary padding ----------------------------------------------------------------------------


VOCAB_ROWS = (32000, 32001, 32064)  # Llama-2; + <AC>; padded to a multiple of 64 (protocol.pad_vocab_multiple)


def section_vocab(args: argparse.Namespace, budget: Budget, record: dict[str, Any]) -> None:
    """Output projection + cross-entropy, forward and backward, at each vocabulary size (same tokens)."""
    hidden, tokens = (64, 256) if args.cpu_smoke else (4096, 8192)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(tokens, hidden, generator=g) * 0.02).to(DEVICE, DTYPE).requires_grad_()
    labels = torch.randint(0, VOCAB_ROWS[0], (tokens,), generator=g).to(DEVICE)
    rows: list[dict[str, Any]] = []
    record.update(hidden=hidden, tokens=tokens, rows=rows)
    for vocab in VOCAB_ROWS:
        if budget.over():
            rows.append({"vocab": vocab, **budget.skip_record()})
            continue
        w = (torch.randn(vocab, hidden, generator=g) * 0.02).to(DEVICE, DTYPE).requires_grad_()

        def step() -> None:
            loss = torch.nn.functional.cross_entropy((x @ w.T).float(), labels)
            loss.backward()
            x.grad = w.grad = None

        rows.append({"vocab": vocab, "status": "ok", **timed(step, args.train_warmup, max(args.repeat, 5), 30.0, budget)})
        del w
        free_memory()
    t = {r["vocab"]: r["s_per_step"] for r in rows if r.get("status") == "ok"}
    record["padded_speedup"] = t[32001] / t[32064] if 32001 in t and 32064 in t else None
    record["status"] = "ok"


# --- driver ----------------------------------------------------------------------------------------


def plan_of(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(section kind, model name) in priority order."""
    if args.model:
        return [("exactness", "model"), ("decode", "model"), ("train", "model")]
    shapes = ["smollm2", "llama2-7b"] if args.shape == "all" else [args.shape]
    plan = [("exactness", shapes[0])]
    for s in shapes:
        plan += [("decode", s), ("train", s)] if s == "smollm2" else [("train", s), ("decode", s)]
    if "llama2-7b" in shapes:
        plan.append(("vocab", "llama2-7b"))
    if args.sections:  # e.g. a second call for what the first one's budget skipped
        plan = [(kind, s) for kind, s in plan if kind in args.sections]
    return plan


def summary_rows(result: dict[str, Any]) -> list[list[Any]]:
    def f(x: Any, fmt: str = "{:.3g}") -> str:
        return "-" if x is None else fmt.format(x)

    rows: list[list[Any]] = []
    for key, sec in result["sections"].items():
        if sec.get("status") != "ok":
            rows.append([key, "", f"{sec.get('status')}: {sec.get('reason') or sec.get('error', '')}"[:110]])
            continue
        if key == "exactness":
            rows.append([key, f"{sec['model']} B=4 P={sec['prompt']}",
                         f"identical {sec['identical_share']:.3f}, first diff step {sec['first_differing_step']}"])
        elif key.startswith("train"):
            for r in sec["rows"]:
                case = f"L={r['length']} {r['rule']}/{r['attn_implementation']}"
                if r.get("status") != "ok":
                    rows.append([key, case, f"{r.get('status')}: {r.get('reason') or r.get('error', '')}"[:110]])
                else:
                    rows.append([key, case, f"{r['s_per_step']:.3f} s/step, {r['tokens_per_s']:,.0f} tok/s, "
                                 f"MFU {f(r['mfu'], '{:.1%}')}, peak {f(r['peak_mem_gib'], '{:.1f}')} GiB"])
        elif key.startswith("vocab"):
            rows.append([key, f"{sec['tokens']} tokens x hidden {sec['hidden']}", ", ".join(
                f"V={r['vocab']}: {r['s_per_step'] * 1e3:.2f} ms" if r.get("status") == "ok" else f"V={r['vocab']}: {r.get('status')}"
                for r in sec["rows"]) + f"; 32001/32064 time {f(sec['padded_speedup'], '{:.2f}')}x"])
        elif key.startswith("decode"):
            for r in sec["rows"]:
                parts = []
                for n in DECODE_CANDIDATES:
                    c = r.get(n)
                    if isinstance(c, dict):
                        parts.append(f"{n} {f(c.get('decode_tokens_per_s'), '{:,.0f}')}" if c.get("status") == "ok"
                                     else f"{n} {c.get('status')}{' OOM' if 'OOM' in c.get('error', '') else ''}")
                if r.get("status") == "skipped":
                    parts = ["skipped (budget)"]
                rows.append([key, f"B={r['batch']} P={r['prompt']}", "tok/s: " + ", ".join(parts)
                             + (f"; anchor/best plain {r['anchor_over_best_plain']:.2f}x" if "anchor_over_best_plain" in r else "")])
            s = sec.get("host_syncs_per_decode_step", {})
            rows.append([key, "host syncs/step", ", ".join(
                f"{k}: {v['host_syncs_per_decode_step']:.1f}" + (f" (cuda {v['anchor']['cuda_sync_events_per_step']:.1f})"
                                                               if v['anchor']['cuda_sync_events_per_step'] is not None else "")
                if v.get("status") == "ok" else f"{k}: {v.get('status')}" for k, v in s.items())])
    return rows


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum} after {time.perf_counter() - T_START:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["smollm2", "llama2-7b", "all"], default=None,
                   help="random model shape(s) to check (default: all; not with --model)")
    p.add_argument("--model", default=None, help="a local HF checkpoint instead of the random shapes")
    p.add_argument("--grad-ckpt", choices=["auto", "on", "off"], default="auto",
                   help="gradient checkpointing in training rows (auto: the 7B shape and checkpoints >= 1B params)")
    p.add_argument("--train-lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--train-lengths-7b", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--sync-prompt", type=int, default=1024, help="prompt length of the host-sync count")
    p.add_argument("--causal-flex", action="store_true",
                   help="add causal flex_attention training rows (flex's cost apart from the rule's; more compiling)")
    p.add_argument("--sections", nargs="+", choices=["exactness", "decode", "train", "vocab"], default=None,
                   help="run only these sections (default: all)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--train-warmup", type=int, default=2)
    p.add_argument("--exact-prompt", type=int, default=1024)
    p.add_argument("--exact-new-tokens", type=int, default=64)
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="seconds after which no further section or row starts (they are recorded as skipped)")
    p.add_argument("--quick", action="store_true", help="small sizes on the GPU")
    p.add_argument("--cpu-smoke", action="store_true", help="the same code on the CPU in fp32 at tiny sizes "
                   "(tests the script, not the hardware)")
    p.add_argument("--out", default="gpu_check", help="a name (bench/results/NAME.json) or a path to a .json file")
    args = p.parse_args()
    if args.model and args.shape:
        p.error("--model replaces the random shapes: pass one of --model and --shape")
    args.shape = args.shape or "all"
    global DEVICE, DTYPE
    if args.cpu_smoke:
        DEVICE, DTYPE = "cpu", torch.float32
        torch.set_num_threads(1)  # tiny sizes: threads only spin against each other on a busy CPU
        args.train_lengths, args.train_lengths_7b, args.batches = [128], [128], [1, 2]
        args.prompt, args.new_tokens, args.repeat, args.train_warmup = 128, 4, 1, 1
        args.exact_prompt, args.exact_new_tokens, args.sync_prompt, args.prefill_chunk = 128, 8, 64, 32
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (run it on a GPU machine, or --cpu-smoke).")
        return
    elif args.quick:
        args.train_lengths, args.train_lengths_7b, args.batches = [1024], [1024], [1, 8]
        args.prompt, args.new_tokens, args.repeat, args.exact_prompt = 1024, 16, 2, 256
    budget = Budget(args.budget_s)
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` sends SIGTERM: write the JSON, then stop
    machine = machine_info()
    plan = plan_of(args)
    result: dict[str, Any] = {
        "settings": vars(args), "device": DEVICE, "dtype": str(DTYPE),
        "gpu_name": torch.cuda.get_device_name(0) if DEVICE == "cuda" else None,
        "peak_bf16_flops": gpu_peak_flops(), "plan": [f"{k}:{m}" if k != "exactness" else k for k, m in plan],
        "models": {}, "sections": {}, "host_syncs_per_decode_step": {}, "complete": False,
    }

    def save() -> None:
        result["wall_s"] = budget.elapsed()
        write_results(args.out, machine, result)

    bench: Bench | None = None
    for kind, name in plan:
        key = kind if kind == "exactness" else f"{kind}:{name}"
        if budget.over():
            result["sections"][key] = budget.skip_record()
            save()
            continue
        t0 = time.perf_counter()
        record: dict[str, Any] = {"status": "running"}
        result["sections"][key] = record
        try:
            if kind == "vocab":  # no model
                section_vocab(args, budget, record)
            else:
                if bench is None or bench.name != name:
                    if bench is not None:
                        result["models"][bench.name] = bench.describe()
                        bench = None
                        free_memory()
                    bench = build(name, args)
                fn = {"exactness": section_exactness, "decode": section_decode, "train": section_train}[kind]
                fn(bench, args, budget, record)
        except KeyboardInterrupt as e:  # SIGTERM (timeout) or Ctrl-C: keep what this section measured
            record.update(status="killed", error=f"{e}", seconds=time.perf_counter() - t0)
            if bench is not None:
                result["models"][bench.name] = bench.describe()
            save()
            raise SystemExit(130) from None
        except Exception as e:  # noqa: BLE001 - the JSON is the report: record and go on
            traceback.print_exc()
            record.update(status="error", error=error_text(e))
            free_memory()
        record["seconds"] = time.perf_counter() - t0
        result["sections"][key] = record
        if kind == "decode" and "host_syncs_per_decode_step" in record:
            result["host_syncs_per_decode_step"][name] = {
                k: v.get("host_syncs_per_decode_step") for k, v in record["host_syncs_per_decode_step"].items()}
        if bench is not None:
            result["models"][bench.name] = bench.describe()
        print(f"== {key}: {record['status']} in {record['seconds']:.1f} s (elapsed {budget.elapsed():.0f} s)", flush=True)
        save()
    result["complete"] = True
    save()
    print_table(f"gpu_check on {result['gpu_name'] or DEVICE} ({str(DTYPE)}, {budget.elapsed():.0f} s)",
                ["section", "case", "result"], summary_rows(result))


if __name__ == "__main__":
    main()
