"""Validation of the composed training config, before anything slow (model download, data) happens.

Every error names the offending key and says how to fix it: a typo in a 32-GPU job should cost
seconds, not the hour it takes to load Llama-2 and tokenise RedPajama.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError  # noqa: F401 - re-exported: callers catch anllm.train.ConfigError

REPO_ROOT = Path(__file__).resolve().parents[3]
CONF_DIR = REPO_ROOT / "conf"

# trainer.* keys that anllm handles itself instead of passing them to TrainingArguments.
ANLLM_TRAINER_KEYS = ("resume", "save_total_limit", "distill")
TOP_LEVEL_KEYS = (
    "exp_name", "scale_name", "output_dir", "cache_dir", "block_size", "anchor", "preprocessing",
    "metrics", "wandb", "trainer", "model", "data", "deepspeed", "heldout", "protocol",
)
ANCHOR_KEYS = ("mode", "token", "ep_punctuation", "num_sink_tokens", "anchors_see_anchors", "window", "ep_tokens",
               "ac_after_last", "ac_join")
MODEL_SOURCES = ("smollm2", "tiny", "pretrained")
MODEL_KEYS = ("name", "source", "path", "context_length", "dtype", "attn_implementation", "tiny")
DATA_KINDS = ("jsonl", "demo", "hub", "sft")
NO_ANSAN_BACKENDS = ("flash_attention_2", "flash_attention_3", "paged_attention")
RESUME_WORDS = ("auto", "never")


def available_options(group: str) -> list[str]:
    """Options of a config group (``exp``, ``model``, ...), from Hydra when it runs, else from conf/."""
    try:
        from hydra.core.global_hydra import GlobalHydra

        gh = GlobalHydra.instance()
        if gh.is_initialized():
            return sorted(gh.config_loader().get_group_options(group))
    except Exception:  # pragma: no cover - Hydra internals differ; fall back to the files
        pass
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _close(word: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


def _plain(node: Any) -> Any:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def resolve_bf16(value: Any) -> bool:
    """``auto`` means bf16 wherever the hardware runs it natively: CUDA devices with bf16 support."""
    if isinstance(value, str):
        if value.lower() != "auto":
            raise ConfigError(f"trainer.bf16={value!r}: use true, false or auto.")
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(value)


def validate(cfg: DictConfig | Mapping, *, check_files: bool = True) -> None:
    """Raise :class:`ConfigError` for the first problem found in a composed config.

    ``check_files`` also checks that local data files exist (skipped for the hub).
    """
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    exps = available_options("exp")
    exp = cfg.get("exp_name")
    if not exp:
        raise ConfigError(
            "No experiment chosen: add +exp=<name> to the command (available: " + ", ".join(exps) + "). "
            "Example: python train.py +exp=anllm_ac"
        )
    unknown = sorted(set(cfg.keys()) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {unknown} at the top level.{_close(unknown[0], TOP_LEVEL_KEYS)} "
            f"Known keys: {', '.join(TOP_LEVEL_KEYS)}."
        )
    _check_anchor(cfg)
    _check_model(cfg)
    _check_block_size(cfg)
    _check_data(cfg, check_files)
    _check_trainer(cfg)
    _check_deepspeed(cfg)
    from .heldout import validate as validate_heldout

    validate_heldout(plain_dict(cfg))
    if not cfg.get("output_dir"):
        raise ConfigError("output_dir is empty: set output_dir=<directory for checkpoints and the final model>.")


def _check_anchor(cfg: DictConfig) -> None:
    anchor = cfg.get("anchor") or {}
    extra = sorted(set(anchor.keys()) - set(ANCHOR_KEYS))
    if extra:
        raise ConfigError(f"Unknown key anchor.{extra[0]}.{_close(extra[0], ANCHOR_KEYS)} Known: {', '.join(ANCHOR_KEYS)}.")
    mode = anchor.get("mode")
    if mode not in ("ac", "ep", "none"):
        raise ConfigError(f"anchor.mode={mode!r}: choose ac, ep or none (the exp sets it).")
    if mode == "ep" and not anchor.get("ep_punctuation"):
        raise ConfigError("anchor.ep_punctuation is empty: EP needs sentence-ending characters, e.g. '.!?'.")
    join = anchor.get("ac_join")
    if mode == "ac" and join is not None and str(anchor.get("token")) not in str(join):
        raise ConfigError(f"anchor.ac_join={join!r} must contain the anchor token {anchor.get('token')!r} "
                          "(the authors' join is ' <AC> ').")
    splitter = (cfg.get("data") or {}).get("splitter")
    if splitter is not None and splitter not in ("blingfire", "pysbd", "punkt"):
        raise ConfigError(f"data.splitter={splitter!r}: choose blingfire, pysbd or punkt.")
    if mode == "ac" and not anchor.get("token"):
        raise ConfigError("anchor.token is empty: AC needs the anchor token text, e.g. '<AC>'.")
    for key in ("num_sink_tokens", "window"):
        value = anchor.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"anchor.{key}={value!r} must be an integer >= 0 (0 = off).")


def _check_model(cfg: DictConfig) -> None:
    model = cfg.get("model") or {}
    extra = sorted(set(model.keys()) - set(MODEL_KEYS))
    if extra:
        raise ConfigError(f"Unknown key model.{extra[0]}.{_close(extra[0], MODEL_KEYS)} Known: {', '.join(MODEL_KEYS)}.")
    source = model.get("source")
    if source not in MODEL_SOURCES:
        raise ConfigError(
            f"model.source={source!r}: choose one of {MODEL_SOURCES} "
            f"(or pick a model config: model={'|'.join(available_options('model'))})."
        )
    if source == "pretrained" and not model.get("path"):
        raise ConfigError("model.path is empty: give a hub id or a local HF checkpoint directory.")
    ctx = model.get("context_length")
    if not isinstance(ctx, int) or ctx < 2:
        raise ConfigError(f"model.context_length={ctx!r} must be a positive integer (the model's trained context).")
    dtype = model.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype={dtype!r}: choose float32, bfloat16 or float16.")
    impl = model.get("attn_implementation", "sdpa")
    if cfg.anchor.mode != "none" and impl in NO_ANSAN_BACKENDS:
        raise ConfigError(
            f"model.attn_implementation={impl!r} cannot express the AnSAN mask (anchor.mode={cfg.anchor.mode}). "
            "Use sdpa, eager or flex_attention."
        )


def _check_block_size(cfg: DictConfig) -> None:
    block = cfg.get("block_size")
    if not isinstance(block, int) or block < 2:
        raise ConfigError(f"block_size={block!r} must be an integer >= 2 (tokens per training row).")
    ctx = cfg.model.context_length
    if block > ctx:
        raise ConfigError(
            f"block_size={block} is larger than model.context_length={ctx} ({cfg.model.name}). "
            f"Use block_size={ctx} or less, or train beyond the pretrained context on purpose with "
            f"model.context_length={block} (the authors' Llama-2 AC run did this with 8192)."
        )


def _check_data(cfg: DictConfig, check_files: bool) -> None:
    data = cfg.get("data") or {}
    kind = data.get("kind")
    if kind not in DATA_KINDS:
        raise ConfigError(
            f"data.kind={kind!r}: choose one of {DATA_KINDS} (or a data config: data={'|'.join(available_options('data'))})."
        )
    max_steps = (cfg.get("trainer") or {}).get("max_steps", -1)
    if kind == "hub":
        if not data.get("name") and not data.get("data_files"):
            raise ConfigError(
                "data.name and data.data_files are both empty: give the hub dataset id "
                "(e.g. togethercomputer/RedPajama-Data-1T-Sample) and/or JSONL file globs/URLs."
            )
        if data.get("streaming", True) and (max_steps is None or int(max_steps) <= 0):
            raise ConfigError(
                "data.streaming=true has no length, so epochs cannot be counted: set trainer.max_steps=<optimizer steps>."
            )
    if not check_files:
        return
    from anllm.data.sources import resolve_paths

    base = data.get("base_dir")
    try:
        if kind == "jsonl":
            resolve_paths(list(data.get("paths") or []), base)
        elif kind == "sft":
            named = [data[k] for k in ("alpaca_path", "parallel_path") if data.get(k)]
            if not named:
                raise ConfigError("data.alpaca_path and data.parallel_path are both empty: give at least one.")
            resolve_paths(named, base)
    except (FileNotFoundError, IsADirectoryError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"data ({cfg.data.get('id', kind)}): {e}") from e


def _check_trainer(cfg: DictConfig) -> None:
    trainer = _plain(cfg.get("trainer") or {})
    names = training_argument_names()
    allowed = names | set(ANLLM_TRAINER_KEYS)
    for key in trainer:
        if key not in allowed:
            raise ConfigError(
                f"trainer.{key} is not a transformers.TrainingArguments field.{_close(key, allowed)} "
                "See `python -c \"import transformers; help(transformers.TrainingArguments)\"`."
            )
    for key in ("output_dir", "deepspeed"):
        if key in trainer:
            raise ConfigError(f"trainer.{key} is set from the top-level `{key}` config; set {key}=... instead.")
    resume = trainer.get("resume", "auto")
    if resume is None:
        resume = "never"
    if str(resume) not in RESUME_WORDS and not Path(str(resume)).expanduser().is_dir():
        raise ConfigError(
            f"trainer.resume={resume!r}: use auto (newest complete checkpoint in output_dir), never, "
            "or the path of an existing checkpoint directory."
        )
    limit = trainer.get("save_total_limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"trainer.save_total_limit={limit!r} must be null (keep all) or an integer >= 1.")
    resolve_bf16(trainer.get("bf16", False))
    from .distill import DistillConfig

    DistillConfig.from_dict(trainer.get("distill"))
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        v = trainer.get(key, 1)
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"trainer.{key}={v!r} must be an integer >= 1.")


def _check_deepspeed(cfg: DictConfig) -> None:
    ds = _plain(cfg.get("deepspeed") or {})
    if not ds:
        return
    if not isinstance(ds, dict) or "zero_optimization" not in ds:
        raise ConfigError(
            "deepspeed: a DeepSpeed config needs a zero_optimization section (pick deepspeed=zero2|zero3|zero3_offload)."
        )
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "deepspeed=zero*: the deepspeed package is not installed. Install the extra "
            "(pip install -e '.[deepspeed]') or use deepspeed=none."
        )


def plain_dict(cfg: DictConfig | Mapping) -> dict[str, Any]:
    """The resolved config as plain Python containers."""
    return _plain(cfg) if isinstance(cfg, DictConfig) else dict(cfg)
