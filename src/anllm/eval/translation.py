"""Translation suite: WMT De→En with the authors' Alpaca prompt, greedy decoding, BLEU/chrF/COMET, C⇓, MaxKV.

Reproduces the paper's Table 2 layout: per method one row with quality (BLEU, chrF, COMET-DA) and
cache use: ``c_red`` (C⇓ = 1 − kept/seen keys/values at the end of each sentence, summed over
sentences), ``max_kv`` (MaxKV: the peak number of keys/values held while translating one sentence,
averaged over sentences, as the paper defines it) and ``tokens_per_s``. Methods: ``full``,
``anchor+src`` (AnSAN, source cache kept), ``anchor`` (AnSAN, source cache dropped), and ``ansan``
(AnSAN with a full cache, the losslessness reference); see :mod:`anllm.eval.generation`.

The prompt is the standard Alpaca ``prompt_input`` template with the instruction "Translate the
following sentences from German to English.", built by the SFT code itself so evaluation matches
training: AC models get the anchor token after every sentence of the template's preamble, of the
instruction and of the source (split like training with :func:`anllm.insert_anchor_token`); it is
stripped from the outputs. EP models use the plain prompt (their anchors are the sentence-final
punctuation already in it).

``translation.hypotheses=FILE`` (or a list) scores existing system outputs with the same metrics,
without generating, so external systems land in the same table.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..anchors import AC_TOKEN, Marking
from ..data.sft import build_alpaca_prompt, mark_sentences, marking_for
from ..data.sources import TRANSLATION_INSTRUCTION
from ..modeling import get_anchor_config, is_anchor_aware
from .generation import ANCHOR_METHODS, canonical_method, eos_ids_of, greedy_generate, make_cache
from .metrics import DEFAULT_COMET_MODEL, CometUnavailable, load_comet, score_translations

log = logging.getLogger(__name__)

# The prompt and instruction are the SFT data's own (anllm.data), so evaluation matches training.
INSTRUCTION_DE_EN = TRANSLATION_INSTRUCTION

# task -> (source file, reference file) relative to data_dir; sacrebleu test set name when online.
TASKS: dict[str, tuple[str, str, str]] = {
    "wmt23_de_en": (
        "wmt23_de_en/generaltest2023.de-en.src.de",
        "wmt23_de_en/generaltest2023.de-en.ref.refA.en",
        "wmt23",
    ),
    "wmt22_de_en": ("wmt22_de_en/wmttest2022.de-en.de", "wmt22_de_en/wmttest2022.de-en.en", "wmt22"),
}
DEFAULT_METHODS = ("full", "anchor+src", "anchor")


# ---- data -------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n")


def load_test_set(task: str, data_dir: str | Path | None, limit: int | None = None) -> tuple[list[str], list[str]]:
    """Sources and references of ``task``, from ``data_dir`` (or sacrebleu's copy when it is None)."""
    if task not in TASKS:
        raise ValueError(f"Unknown translation task {task!r}: choose one of {sorted(TASKS)}.")
    src_rel, ref_rel, sacrebleu_name = TASKS[task]
    if data_dir is None:
        try:
            from sacrebleu.utils import get_reference_files, get_source_file

            src_path = Path(get_source_file(sacrebleu_name, "de-en"))
            ref_path = Path(get_reference_files(sacrebleu_name, "de-en")[0])
        except Exception as e:
            raise FileNotFoundError(
                f"No data_dir given and sacrebleu could not fetch {sacrebleu_name} de-en ({type(e).__name__}: "
                f"{e}). Pass data_dir=../shared/data (it holds {src_rel})."
            ) from e
    else:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"data_dir {root} does not exist. Pass data_dir=../shared/data (relative to the repo) or the "
                "absolute path of the shared data directory."
            )
        src_path, ref_path = root / src_rel, root / ref_rel
        for p in (src_path, ref_path):
            if not p.is_file():
                raise FileNotFoundError(f"{task}: {p} not found under data_dir {root} (expected {src_rel} and {ref_rel}).")
    srcs, refs = _read_lines(src_path), _read_lines(ref_path)
    if len(srcs) != len(refs):
        raise ValueError(f"{task}: {src_path} has {len(srcs)} lines but {ref_path} has {len(refs)}.")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive number of segments, got {limit}.")
        srcs, refs = srcs[:limit], refs[:limit]
    return srcs, refs


# ---- prompt ------------------------------------------------------------------------------------


def build_prompt(
    source: str,
    *,
    anchor_token: str | None = None,
    instruction: str = INSTRUCTION_DE_EN,
    splitter: str = "blingfire",
    marking: Marking | None = None,
    template: str = "anllm",
) -> str:
    """The Alpaca ``prompt_input`` prompt exactly as SFT builds it (:func:`anllm.data.sft.build_alpaca_prompt`);
    for AC models (``marking``, or just ``anchor_token``) anchors go where the SFT ``template`` put them."""
    if marking is None and anchor_token is not None:
        marking = Marking(anchor_token, splitter)  # type: ignore[arg-type]
    return build_alpaca_prompt(instruction, source, marking, template)


PROMPT_FORMATS = ("alpaca", "chat")


def build_chat_prompt(
    source: str,
    tokenizer: Any,
    *,
    anchor_token: str | None = None,
    instruction: str = INSTRUCTION_DE_EN,
    splitter: str = "blingfire",
    marking: Marking | None = None,
) -> str:
    """The request as one user turn of the tokenizer's chat template (for chat-tuned base models,
    e.g. SmolLM2-Instruct, that were never trained on the Alpaca template)."""
    if marking is None and anchor_token is not None:
        marking = Marking(anchor_token, splitter)  # type: ignore[arg-type]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("translation.prompt_format=chat needs a tokenizer with a chat template; use prompt_format=alpaca.")
    content = f"{mark_sentences(instruction, marking)}\n\n{mark_sentences(source, marking)}"
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def clean_output(text: str, anchor_token: str | None = None) -> str:
    """One hypothesis line: anchors removed, cut where the model starts a new "###" section,
    whitespace (newlines included) collapsed so files stay line-aligned."""
    if anchor_token:
        text = text.replace(anchor_token, "")
    text = text.split("###", 1)[0]
    return " ".join(text.split())


SRC_CACHE = ("prompt", "source")


def source_span(prompt: str, source: str, marking: Marking | None) -> tuple[int, int]:
    """Character span of the (marked) source inside ``prompt`` (the last occurrence: the input section)."""
    marked = mark_sentences(source.strip(), marking)
    start = prompt.rfind(marked)
    if start < 0:
        raise ValueError("The source text is not found verbatim in the prompt; cannot keep its span (src_cache=source).")
    return start, start + len(marked)


def token_mask(tokenizer: Any, prompt: str, span: tuple[int, int], length: int, add_special_tokens: bool) -> torch.Tensor:
    """``[length]`` bool: the prompt tokens that overlap the character span."""
    enc = tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    offsets = enc["offset_mapping"][:length]
    s, e = span
    return torch.tensor([a < e and b > s and b > a for a, b in offsets], dtype=torch.bool)


def sampling_processor(decoding: str) -> Any:
    """None for greedy decoding; the authors' sampling (temperature 0.1, top-k 40, top-p 0.1) as
    transformers' own logits warpers for ``decoding="paper"``."""
    if decoding == "greedy":
        return None
    if decoding != "paper":
        raise ValueError(f"translation.decoding={decoding!r}: choose greedy or paper.")
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    return LogitsProcessorList([TemperatureLogitsWarper(0.1), TopKLogitsWarper(40), TopPLogitsWarper(0.1)])


def prompt_anchor_token(model: Any) -> str | None:
    """The token to insert into prompts: the AC token of an AC model, else None."""
    cfg = get_anchor_config(model)
    if cfg is not None and cfg.mode == "ac":
        return cfg.anchor_token or AC_TOKEN
    return None


# ---- generation ----------------------------------------------------------------------------------


@dataclass
class TranslationRun:
    """One method's outputs and cache accounting, in segment order."""

    method: str
    hypotheses: list[str]
    raw: list[str]
    prompt_tokens: list[int]
    gen_tokens: list[int]
    seen: list[int]
    kept: list[int]
    max_kept: list[int]
    time_s: float
    trace: list[list[int]] = field(default_factory=list)  # [steps][rows of the first batch]
    trace_segments: list[int] = field(default_factory=list)  # segment index of each trace column
    prompts: list[str] = field(default_factory=list)

    def cache_metrics(self) -> dict[str, float]:
        total_seen = sum(self.seen)
        return {
            "c_red": 1.0 - sum(self.kept) / total_seen if total_seen else 0.0,
            "c_red_peak": 1.0 - sum(self.max_kept) / total_seen if total_seen else 0.0,
            "max_kv": sum(self.max_kept) / len(self.max_kept) if self.max_kept else 0.0,
            "kv_kept": int(sum(self.kept)),
            "kv_total": int(total_seen),
            "time_s": self.time_s,
            "gen_tokens": int(sum(self.gen_tokens)),
            "tokens_per_s": sum(self.gen_tokens) / self.time_s if self.time_s > 0 else 0.0,
        }


def translate(
    model: Any,
    tokenizer: Any,
    sources: Sequence[str],
    method: str,
    *,
    batch_size: int = 4,
    max_new_tokens: int = 512,
    instruction: str = INSTRUCTION_DE_EN,
    splitter: str | None = None,
    prompt_format: str = "alpaca",
    record_trace: bool = True,
    progress: bool = True,
    prefill_chunk_size: int | None = None,
    template: str = "anllm",
    src_cache: str = "prompt",
    position_mode: str = "true",
    decoding: str = "greedy",
    seed: int = 0,
) -> TranslationRun:
    """Translate ``sources`` with ``method`` (batched, left-padded, longest prompts first).

    ``template``: the SFT prompt template (anllm | paper); ``src_cache``: what ``anchor+src`` keeps
    (the whole ``prompt``, or the ``source`` span only, as the authors); ``position_mode``: true |
    compact positions in anchor caches; ``decoding``: greedy | paper (the authors' sampling)."""
    from tqdm.auto import tqdm

    method = canonical_method(method)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if src_cache not in SRC_CACHE:
        raise ValueError(f"translation.src_cache={src_cache!r}: choose one of {SRC_CACHE}.")
    marking = marking_for(get_anchor_config(model), splitter)
    anchor_token = marking.token if marking is not None else None
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"translation.prompt_format={prompt_format!r}: choose one of {PROMPT_FORMATS}.")
    if prompt_format == "chat":
        prompts = [build_chat_prompt(s, tokenizer, marking=marking, instruction=instruction) for s in sources]
    else:
        prompts = [build_prompt(s, marking=marking, instruction=instruction, template=template) for s in sources]
    spans = [source_span(p, s, marking) for p, s in zip(prompts, sources)]
    sampler = sampling_processor(decoding)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    eos = eos_ids_of(model, tokenizer)
    # A chat template already spells out its special tokens.
    encoded = [tokenizer(p, add_special_tokens=prompt_format != "chat")["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    n = len(prompts)
    res: dict[str, list[Any]] = {k: [None] * n for k in ("hyp", "raw", "gen", "seen", "kept", "max_kept")}
    total_time = 0.0
    trace: list[list[int]] = []
    trace_segments: list[int] = []
    device = next(model.parameters()).device
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    for b, idx in enumerate(tqdm(batches, desc=f"translate [{method}]", disable=not progress, leave=False)):
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        am = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            am[r, width - len(encoded[i]) :] = 1
        cache = make_cache(method, position_mode)
        if method == "anchor+src" and src_cache == "source":
            keep = torch.zeros((len(idx), width), dtype=torch.bool)
            for r, i in enumerate(idx):
                keep[r, width - len(encoded[i]) :] = token_mask(tokenizer, prompts[i], spans[i], len(encoded[i]),
                                                               prompt_format != "chat")
            cache.keep_prompt(keep.to(device))  # type: ignore[union-attr]
        out = greedy_generate(
            model,
            ids.to(device),
            am.to(device),
            method,
            max_new_tokens=max_new_tokens,
            eos_token_ids=eos,
            pad_token_id=pad_id,
            record_trace=record_trace and b == 0,
            prefill_chunk_size=prefill_chunk_size,
            cache=cache,
            sampler=sampler,
            seed=seed + b,
        )
        total_time += out.time_s
        if b == 0:
            trace, trace_segments = out.trace, list(idx)
        for r, i in enumerate(idx):
            raw = tokenizer.decode(out.tokens[r, : out.lengths[r]].tolist(), skip_special_tokens=True)
            res["raw"][i] = raw
            res["hyp"][i] = clean_output(raw, anchor_token)
            res["gen"][i] = out.lengths[r]
            res["seen"][i] = out.seen[r]
            res["kept"][i] = out.kept[r]
            res["max_kept"][i] = out.max_kept[r]
    return TranslationRun(
        method=method,
        hypotheses=res["hyp"],
        raw=res["raw"],
        prompt_tokens=[len(e) for e in encoded],
        gen_tokens=res["gen"],
        seen=res["seen"],
        kept=res["kept"],
        max_kept=res["max_kept"],
        time_s=total_time,
        trace=trace,
        trace_segments=trace_segments,
        prompts=prompts,
    )


# ---- the suite -----------------------------------------------------------------------------------


def _opt(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def resolve_methods(tcfg: Any, run_modes: Sequence[str] | None, anchor_aware: bool) -> tuple[list[str], list[str]]:
    """Methods to run and notes. ``translation.methods`` wins; else the run's ``modes`` are mapped
    (``anchor`` -> ``anchor+src`` and ``anchor``, as the paper's Table 2). A plain model runs ``full``."""
    notes: list[str] = []
    explicit = _opt(tcfg, "methods")
    if explicit:
        methods = [canonical_method(m) for m in ([explicit] if isinstance(explicit, str) else list(explicit))]
    elif run_modes:
        methods = []
        for m in ([run_modes] if isinstance(run_modes, str) else list(run_modes)):
            for c in (("anchor+src", "anchor") if m == "anchor" else (canonical_method(m),)):
                if c not in methods:
                    methods.append(c)
    else:
        methods = list(DEFAULT_METHODS)
    if not anchor_aware:
        dropped = [m for m in methods if m in ANCHOR_METHODS]
        methods = [m for m in methods if m not in ANCHOR_METHODS] or ["full"]
        if dropped:
            notes.append(
                f"translation: the model has no anchor settings, so only full attention was evaluated "
                f"(skipped {', '.join(dropped)})."
            )
    return methods, notes


def hypothesis_files(spec: Any) -> list[Path]:
    """``translation.hypotheses``: one path or a list (or a comma-separated string)."""
    if spec is None or spec == "":
        return []
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths: list[Path] = []
    for item in items:
        for part in str(item).split(","):
            if part.strip():
                p = Path(part.strip()).expanduser()
                if not p.is_file():
                    raise FileNotFoundError(f"translation.hypotheses: {p} does not exist (one hypothesis per line).")
                paths.append(p)
    return paths


def system_name(path: Path) -> str:
    """A table label for an external system file: WMT's ``*.hyp.<SYSTEM>.<lang>`` gives SYSTEM."""
    name = path.name
    if ".hyp." in name:
        return name.split(".hyp.", 1)[1].rsplit(".", 1)[0]
    return path.stem


def load_hypotheses(path: Path, n_expected: int, n_total: int | None = None) -> list[str]:
    """Lines of ``path``: exactly the test set's length, cut to ``limit`` when one is set."""
    lines = _read_lines(path)
    if len(lines) < n_expected or (n_total is not None and len(lines) not in (n_total, n_expected)):
        raise ValueError(
            f"{path} has {len(lines)} lines but the test set has {n_total or n_expected} segments: a "
            "hypothesis file needs one line per source segment, in order."
        )
    return lines[:n_expected]


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.write_text("".join(line.replace("\n", " ") + "\n" for line in lines), encoding="utf-8")


def _comet_once(spec: str | None, notes: list[str]) -> Any:
    if not spec:
        notes.append("translation: COMET disabled (translation.comet_model=null); BLEU/chrF reported.")
        return None
    try:
        return load_comet(spec)
    except CometUnavailable as e:
        notes.append(f"translation: COMET not computed — {e} BLEU/chrF are reported.")
        log.warning(notes[-1])
        return None


def evaluate_translation(
    model: Any,
    tokenizer: Any,
    task: str,
    *,
    data_dir: str | Path | None,
    out_dir: Path | None = None,
    limit: int | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    hypotheses: Sequence[Path] = (),
    generate: bool = True,
    batch_size: int = 4,
    max_new_tokens: int = 512,
    comet_model: str | None = DEFAULT_COMET_MODEL,
    comet_batch_size: int = 8,
    instruction: str = INSTRUCTION_DE_EN,
    splitter: str | None = None,
    prompt_format: str = "alpaca",
    plots: bool = True,
    progress: bool = True,
    prefill_chunk_size: int | None = None,
    **generation: Any,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run one translation task; returns (rows, notes). Writes hypotheses/per-segment files/plots
    to ``out_dir`` when given."""
    srcs, refs = load_test_set(task, data_dir, limit)
    notes: list[str] = []
    comet = _comet_once(comet_model, notes)
    comet_label = comet_model if comet is not None else None
    rows: list[dict[str, Any]] = []
    runs: list[TranslationRun] = []

    def metrics_row(method: str, hyps: list[str]) -> dict[str, Any]:
        scores = score_translations(srcs, hyps, refs, comet_model=comet_label, comet=comet, comet_batch_size=comet_batch_size)
        row: dict[str, Any] = {"suite": "translation", "task": task, "method": method, "split": "test", "n": len(srcs)}
        for k in ("bleu", "chrf", "comet", "bleu_signature", "chrf_signature"):
            row[k] = scores[k]
        row["comet_model"] = comet_label
        return row

    if hypotheses:
        n_total = len(load_test_set(task, data_dir, None)[0])
        for path in hypotheses:
            row = metrics_row(system_name(path), load_hypotheses(path, len(srcs), n_total))
            row["note"] = f"external outputs: {path.name}"
            rows.append(row)
    if generate:
        if model is None:
            raise ValueError("translation: no model to generate with; pass a checkpoint or translation.hypotheses=FILE.")
        for method in methods:
            run = translate(
                model,
                tokenizer,
                srcs,
                method,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                instruction=instruction,
                splitter=splitter,
                prompt_format=prompt_format,
                progress=progress,
                prefill_chunk_size=prefill_chunk_size,
                **generation,
            )
            runs.append(run)
            row = metrics_row(method, run.hypotheses)
            row.update(run.cache_metrics())
            row.update({k: generation[k] for k in ("src_cache", "decoding", "position_mode", "template") if k in generation})
            row["max_new_tokens"] = max_new_tokens
            row["prompt_format"] = prompt_format
            truncated = sum(g >= max_new_tokens for g in run.gen_tokens)
            if truncated:
                row["note"] = f"{truncated}/{len(srcs)} outputs hit max_new_tokens={max_new_tokens}"
            rows.append(row)
            if out_dir is not None:
                _save_run(Path(out_dir), run, srcs, refs)
    if out_dir is not None and plots and runs:
        _plots(Path(out_dir), runs, model, tokenizer)
    return rows, notes


def _save_run(out_dir: Path, run: TranslationRun, srcs: Sequence[str], refs: Sequence[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = run.method.replace("+", "_")
    _write_lines(out_dir / f"{tag}.hyp.en", run.hypotheses)
    with open(out_dir / f"{tag}.segments.jsonl", "w", encoding="utf-8") as f:
        for i, (s, r) in enumerate(zip(srcs, refs)):
            rec = {
                "i": i,
                "src": s,
                "ref": r,
                "hyp": run.hypotheses[i],
                "raw": run.raw[i],
                "prompt_tokens": run.prompt_tokens[i],
                "gen_tokens": run.gen_tokens[i],
                "kv_seen": run.seen[i],
                "kv_kept": run.kept[i],
                "max_kv": run.max_kept[i],
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _plots(out_dir: Path, runs: list[TranslationRun], model: Any, tokenizer: Any) -> None:
    from .plots import plot_ansan_mask_for_text, plot_cache_over_steps

    seg = runs[0].trace_segments[0] if runs[0].trace_segments else 0
    traces = {}
    for run in runs:
        if run.trace and run.trace_segments:
            col = run.trace_segments.index(seg)
            traces[run.method] = [step[col] for step in run.trace]
    if traces:
        plot_cache_over_steps(traces, out_dir / "cache_over_steps.png", title=f"KV cache while translating segment {seg}")
    if is_anchor_aware(model):
        plot_ansan_mask_for_text(model, tokenizer, runs[0].prompts[seg], out_dir / "ansan_mask.png")


def run_task(bundle: Any, cfg: Any, task: str, out_dir: Path) -> list[dict[str, Any]]:
    """Suite entry point (see :mod:`anllm.eval.suites`)."""
    tcfg = _opt(cfg, "translation", {})
    hyp_files = hypothesis_files(_opt(tcfg, "hypotheses"))
    generate = _opt(tcfg, "generate")
    if generate is None:
        generate = not hyp_files
    model = getattr(bundle, "model", None)
    anchor_aware = model is not None and is_anchor_aware(model)
    methods, notes = resolve_methods(tcfg, _opt(cfg, "modes"), anchor_aware)
    rows, run_notes = evaluate_translation(
        model,
        getattr(bundle, "tokenizer", None),
        task,
        data_dir=_opt(cfg, "data_dir"),
        out_dir=out_dir,
        limit=_opt(cfg, "limit"),
        methods=methods,
        hypotheses=hyp_files,
        generate=bool(generate),
        batch_size=int(_opt(tcfg, "batch_size", _opt(cfg, "batch_size", 4))),
        max_new_tokens=int(_opt(tcfg, "max_new_tokens", 512)),
        comet_model=tcfg.get("comet_model", DEFAULT_COMET_MODEL) if hasattr(tcfg, "get") else DEFAULT_COMET_MODEL,
        comet_batch_size=int(_opt(tcfg, "comet_batch_size", 8)),
        instruction=str(_opt(tcfg, "instruction", INSTRUCTION_DE_EN)),
        splitter=_opt(tcfg, "splitter"),
        prompt_format=str(_opt(tcfg, "prompt_format", "alpaca")),
        plots=bool(_opt(tcfg, "plots", True)),
        progress=bool(_opt(cfg, "progress", True)),
        prefill_chunk_size=_opt(tcfg, "prefill_chunk_size"),
        template=str(_opt(tcfg, "template", "anllm")),
        src_cache=str(_opt(tcfg, "src_cache", "prompt")),
        position_mode=str(_opt(cfg, "position_mode", "true")),
        decoding=str(_opt(tcfg, "decoding", "greedy")),
        seed=int(_opt(tcfg, "seed", 0)),
    )
    notes = notes + run_notes
    bundle_notes = getattr(bundle, "notes", None)
    if bundle_notes is not None:
        for note in notes:
            if note not in bundle_notes:
                bundle_notes.append(note)
    if notes and rows:
        for row in rows:
            if row.get("comet") is None and not row.get("note"):
                row["note"] = "no COMET model (see notes)"
    return rows


def _selected_tasks(cfg: Any, known: Sequence[str], default: Sequence[str]) -> list[str]:
    requested = _opt(cfg, "tasks")
    if requested is None:
        return list(default)
    requested = [requested] if isinstance(requested, str) else list(requested)
    return [t for t in requested if t in known]


def check(cfg: Any) -> None:
    """Validate ``translation.*`` and the data before the model loads (errors name the fix)."""
    tcfg = _opt(cfg, "translation", {})
    explicit = _opt(tcfg, "methods")
    for m in [explicit] if isinstance(explicit, str) else list(explicit or []):
        canonical_method(m)
    hypothesis_files(_opt(tcfg, "hypotheses"))
    if str(_opt(tcfg, "prompt_format", "alpaca")) not in PROMPT_FORMATS:
        raise ValueError(f"translation.prompt_format={_opt(tcfg, 'prompt_format')!r}: choose one of {PROMPT_FORMATS}.")
    for key in ("max_new_tokens", "comet_batch_size", "batch_size"):
        value = _opt(tcfg, key)
        if value is not None and int(value) < 1:
            raise ValueError(f"translation.{key} must be >= 1, got {value}.")
    for task in _selected_tasks(cfg, tuple(TASKS), ("wmt23_de_en",)):
        if _opt(cfg, "data_dir") is not None:
            load_test_set(task, _opt(cfg, "data_dir"), 1)


def _make_suite() -> Any:
    from .suites import Suite

    return Suite(
        name="translation",
        tasks=tuple(TASKS),
        default_tasks=("wmt23_de_en",),
        run_task=run_task,
        describe="WMT De→En (Alpaca prompt, greedy): BLEU, chrF, COMET-DA, C⇓, MaxKV, tokens/s",
        check=check,
    )


SUITE = _make_suite()
