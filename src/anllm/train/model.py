"""Model + tokenizer for training: load (tiny | SmolLM2 | any HF checkpoint), then make it anchor-aware.

Order matters for DeepSpeed ZeRO-3: the TrainingArguments (which register the DeepSpeed config)
must exist before ``from_pretrained`` so weights are partitioned while loading. Adding ``<AC>`` to a
partitioned embedding needs the rows gathered, which :func:`_add_ac_token_zero3` does with
DeepSpeed's public ``GatheredParameters``; ``prepare_model`` then finds the token already there.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Mapping

import torch

from ..anchors import AC_TOKEN
from ..modeling import get_anchor_config, prepare_model

logger = logging.getLogger("anllm.train")


def load_base_model(model_cfg: Mapping[str, Any]) -> tuple[Any, Any]:
    """The model and tokenizer named by ``cfg.model``, before any anchor preparation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model_cfg["source"]
    ctx = int(model_cfg["context_length"])
    impl = model_cfg.get("attn_implementation") or "sdpa"
    dtype = getattr(torch, model_cfg.get("dtype") or "float32")
    if source == "tiny":
        from ..models.tiny import tiny_model_and_tokenizer

        model, tok = tiny_model_and_tokenizer(**dict(model_cfg.get("tiny") or {}), context_length=ctx, attn_implementation=impl)
        return model.to(dtype), tok
    if source == "smollm2":
        from ..models.smollm2 import smollm2_path

        path = str(model_cfg.get("path") or smollm2_path())
    else:
        path = str(model_cfg["path"])
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, attn_implementation=impl)
    return model, tok


def extend_context(model: Any, tokenizer: Any, context_length: int) -> None:
    """Let the model and tokenizer accept ``context_length`` positions (logged when it is an extension)."""
    cfg = model.config
    current = getattr(cfg, "max_position_embeddings", None)
    if current is not None and current < context_length:
        logger.warning(
            "Training beyond the model's pretrained context: max_position_embeddings %d -> %d (RoPE positions past "
            "%d are learned from this run).", current, context_length, current,
        )
        cfg.max_position_embeddings = context_length
    if getattr(tokenizer, "model_max_length", 0) < context_length or tokenizer.model_max_length > 10**9:
        tokenizer.model_max_length = context_length


def ensure_pad_token(tokenizer: Any) -> None:
    """The collator pads; Llama-2 has no pad token, so reuse UNK (or EOS). Padded labels are -100."""
    if tokenizer.pad_token is not None:
        return
    for name in ("unk_token", "eos_token"):
        if getattr(tokenizer, name, None) is not None:
            tokenizer.pad_token = getattr(tokenizer, name)
            logger.info("Tokenizer has no pad token; padding with %s %r.", name, tokenizer.pad_token)
            return
    raise ValueError("The tokenizer has neither pad, unk nor eos token; set tokenizer.pad_token before training.")


def _single_token_id(tokenizer: Any, text: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(text)
    if tid is not None and tid != getattr(tokenizer, "unk_token_id", None):
        return int(tid)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"No token for {text!r} to initialise the anchor embedding from.")
    return int(ids[-1])


def _add_ac_token_zero3(model: Any, tokenizer: Any, token: str) -> None:
    """``<AC>`` for a ZeRO-3-partitioned model: resize (HF gathers), then copy the rows of "." gathered."""
    import deepspeed

    from ..anchors import register_ac_token

    if token in tokenizer.get_vocab():
        return
    src = _single_token_id(tokenizer, ".")
    new_id = register_ac_token(tokenizer, token)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weights = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not weights[0]:
        weights.append(out.weight)
    with deepspeed.zero.GatheredParameters(weights, modifier_rank=0), torch.no_grad():
        for w in weights:
            w[new_id] = w[src]


def pad_vocab(model: Any, tokenizer: Any, multiple: int) -> int:
    """Pad the embedding rows to a multiple of ``multiple`` and return the new row count.

    Why: adding ``<AC>`` to Llama-2 makes 32,001 rows, an odd size for the GPU output matmul (the
    largest one of a 7B model at this vocabulary); 32,064 runs on full tensor-core tiles. The dummy rows
    are zero in the input and the output embeddings: no tokenizer id reaches them, and their logit is
    exactly 0 at the start (the cross-entropy then lowers it, as they are never a target), so the real
    tokens' logits are untouched. Works under ZeRO-3 (rows gathered on rank 0 and re-partitioned).
    """
    rows = len(tokenizer)
    target = -(-rows // multiple) * multiple
    weight = model.get_input_embeddings().weight
    current = int(getattr(weight, "ds_shape", weight.shape)[0])
    if current >= target and current % multiple == 0:
        return current
    model.resize_token_embeddings(rows, pad_to_multiple_of=multiple, mean_resizing=False)
    weights = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not weights[0]:
        weights.append(out.weight)
    gather = contextlib.nullcontext()
    if hasattr(weights[0], "ds_shape"):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
    with gather, torch.no_grad():
        for w in weights:
            w[rows:] = 0
    return int(getattr(weights[0], "ds_shape", weights[0].shape)[0])


def build_model_and_tokenizer(cfg: Mapping[str, Any]) -> tuple[Any, Any]:
    """Load ``cfg.model`` and apply ``cfg.anchor`` with :func:`anllm.prepare_model`."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    model_cfg, anchor = cfg["model"], cfg["anchor"]
    model, tok = load_base_model(model_cfg)
    extend_context(model, tok, int(model_cfg["context_length"]))
    ensure_pad_token(tok)
    token = anchor.get("token") or AC_TOKEN
    if anchor["mode"] == "ac" and is_deepspeed_zero3_enabled():
        _add_ac_token_zero3(model, tok, token)
    model, tok = prepare_model(
        model,
        tok,
        mode=anchor["mode"],
        ep_punctuation=anchor.get("ep_punctuation") or ".!?",
        anchor_token=token,
        num_sink_tokens=int(anchor.get("num_sink_tokens") or 0),
        window=int(anchor.get("window") or 0),
        anchors_see_anchors=bool(anchor.get("anchors_see_anchors")),
        ep_tokens=list(anchor["ep_tokens"]) if anchor.get("ep_tokens") else None,
        splitter=str(cfg["data"].get("splitter") or "blingfire"),
        ac_after_last=bool(anchor.get("ac_after_last", True)),
        ac_join=anchor.get("ac_join"),
    )
    multiple = model_cfg.get("pad_vocab_multiple")
    if multiple:
        rows = pad_vocab(model, tok, int(multiple))
        logger.info("Vocabulary rows padded to %d (tokenizer %d, model.pad_vocab_multiple=%d)", rows, len(tok), int(multiple))
    acfg = get_anchor_config(model)
    if acfg is not None and acfg.enabled:
        shown = acfg.anchor_token_ids[:8]
        logger.info(
            "Anchor mode %s: %d anchor token id(s) %s%s", acfg.mode, len(acfg.anchor_token_ids), shown,
            " ..." if len(acfg.anchor_token_ids) > 8 else "",
        )
    return model, tok
