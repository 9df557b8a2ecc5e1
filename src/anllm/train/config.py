"""Validation of the composed training config, before anything slow (model download, data) happens.

Every error names the offending key and says how to fix it: a typo in a 32-GPU job should cost
seconds, not the hour it takes to load Llama-2 and tokenise RedPajama.
"""

from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError  # noqa: F401 - re-exported: callers catch anllm.train.ConfigError

# The keys each section takes live in the schemas (anllm.schema); these names stay for importers.
from ..schema.train import DATA_KINDS, MODEL_SOURCES, NO_ANSAN_BACKENDS  # noqa: E402,F401
from ..schema.trainer import ANLLM_TRAINER_KEYS, RESUME_WORDS  # noqa: E402,F401
from ..schema.confdir import available_options  # noqa: E402


def resolve_bf16(value: Any) -> bool:
    """``auto`` means bf16 wherever the hardware runs it natively: CUDA devices with bf16 support."""
    if isinstance(value, str):
        if value.lower() != "auto":
            raise ConfigError(f"trainer.bf16={value!r}: use true, false or auto.")
        import torch

        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(value)


def validate(cfg: DictConfig | Mapping, *, check_files: bool = True) -> None:
    """Raise :class:`ConfigError` (one line naming the key, the value and what is allowed) for the first
    problem found in a composed config, before anything slow happens.

    The schema (:mod:`anllm.schema.train`) checks types, unknown keys, allowed values and ranges of
    every section; the rules below check what spans sections. ``check_files`` also checks that local
    data files exist (skipped for the hub)."""
    from ..schema import check_data, check_deepspeed, check_model, check_section, check_trainer
    from ..schema.core import plain
    from ..schema.train import TrainSchema

    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    exps = available_options("exp")
    if not cfg.get("exp_name"):
        raise ConfigError(
            "No experiment chosen: add +exp=<name> to the command (available: " + ", ".join(exps) + "). "
            "Example: python train.py +exp=anllm_ac"
        )
    c = plain(cfg)
    top = check_section(TrainSchema, c)
    model = check_model(c.get("model"))
    if top.anchor.mode != "none" and model.attn_implementation in NO_ANSAN_BACKENDS:
        raise ConfigError(
            f"model.attn_implementation={model.attn_implementation!r} cannot express the AnSAN mask "
            f"(anchor.mode={top.anchor.mode}). Use sdpa, eager or flex_attention."
        )
    _check_block_size(top.block_size, model)
    check_data(c.get("data"))
    _check_data(c, check_files)
    check_trainer(c.get("trainer") or {})
    check_deepspeed(c.get("deepspeed"))
    from .heldout import validate as validate_heldout

    validate_heldout(c)
    if not c.get("output_dir"):
        raise ConfigError("output_dir is empty: set output_dir=<directory for checkpoints and the final model>.")


def _check_block_size(block: Any, model: Any) -> None:
    if not isinstance(block, int) or block < 2:
        raise ConfigError(f"block_size={block!r} must be an integer >= 2 (tokens per training row).")
    ctx = model.context_length
    if block > ctx:
        raise ConfigError(
            f"block_size={block} is larger than model.context_length={ctx} ({model.name}). "
            f"Use block_size={ctx} or less, or train beyond the pretrained context on purpose with "
            f"model.context_length={block} (the authors' Llama-2 AC run did this with 8192)."
        )


def _check_data(c: Mapping[str, Any], check_files: bool) -> None:
    """What the data schema cannot see: the hub's step count, and that local files exist."""
    data = c.get("data") or {}
    kind = data.get("kind")
    max_steps = (c.get("trainer") or {}).get("max_steps", -1)
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
            resolve_paths([data[k] for k in ("alpaca_path", "parallel_path") if data.get(k)], base)
    except (FileNotFoundError, IsADirectoryError, ValueError) as e:
        raise ConfigError(f"data ({data.get('id', kind)}): {e}") from e


def training_argument_names() -> set[str]:
    from ..schema.trainer import training_argument_types

    return set(training_argument_types())


