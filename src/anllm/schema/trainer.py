"""The pass-through sections: ``trainer`` (transformers.TrainingArguments) and ``deepspeed`` (its JSON).

``trainer``: every key is a field of ``TrainingArguments`` (or one of anllm's own three: ``resume``,
``save_total_limit``, ``distill``); each value is checked against the field's type (Hydra reads
``trainer.learning_rate=abc`` as the string ``'abc'``, which TrainingArguments would accept and the
Trainer would trip over an hour later), enum-typed fields against their members (schedulers,
optimizers, strategies), and then ``TrainingArguments`` itself is built from the section so its own
checks (``warmup_ratio`` in [0, 1], ``fp16`` and ``bf16`` together, ...) run now. Building it here
neither creates a directory nor touches CUDA, the process group or DeepSpeed: ``output_dir`` is a
path that is never created, ``deepspeed`` is left out, the device set-up is skipped (a subclass
whose ``framework`` is not ``"pt"``), and the environment variables it sets are restored.

``deepspeed``: a structural check (building ``DeepSpeedConfig`` needs a process group): the
top-level keys are DeepSpeed's, ``zero_optimization`` has a ``stage`` in 0..3 and only the keys of
DeepSpeed's ZeRO config (as of deepspeed 0.18), the offload devices are none/cpu/nvme, and the
fp16/bf16 ``enabled`` flags are true/false/"auto" (the HF Trainer fills in "auto" values).
"""

from __future__ import annotations

import enum
import functools
import os
import tempfile
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Mapping

from .core import ConfigError, choices_text, close, describe, first_line, fmt

# trainer.* keys that anllm handles itself instead of passing them to TrainingArguments.
ANLLM_TRAINER_KEYS = ("resume", "save_total_limit", "distill")
RESUME_WORDS = ("auto", "never")


@functools.lru_cache(maxsize=1)
def training_argument_types() -> dict[str, Any]:
    """``{field: type}`` of the ``TrainingArguments`` fields a config may set."""
    import dataclasses

    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def _enum_in(tp: Any) -> type[enum.Enum] | None:
    for a in (typing.get_args(tp) or (tp,)):
        if isinstance(a, type) and issubclass(a, enum.Enum):
            return a
    return None


def type_problem(value: Any, tp: Any) -> str | None:
    """Why ``value`` does not fit the type ``tp`` (None when it does)."""
    if tp is Any:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None:
            return None if type(None) in members else f"takes {describe(tp)}"
        members_ok = [type_problem(value, m) is None for m in members if m is not type(None)]
        en = _enum_in(tp)
        if en is not None and isinstance(value, str):
            allowed = [m.value for m in en]
            if value not in allowed:
                return f"choose one of {choices_text(allowed)}.{close(value, allowed)}"
            return None
        return None if any(members_ok) else f"takes {describe(tp)}"
    if value is None:
        return f"takes {describe(tp)}, not null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        return None if value in allowed else f"choose one of {choices_text(allowed)}.{close(value, allowed)}"
    if tp is bool:
        return None if isinstance(value, bool) else "takes true or false"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "takes an integer"
    if tp is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "takes a number"
    if tp is str:
        return None if isinstance(value, str) else "takes a string"
    if origin in (list, typing.List) or tp is list:
        if not isinstance(value, list):
            return f"takes {describe(tp)}"
        inner = (typing.get_args(tp) or (Any,))[0]
        bad = next((v for v in value if type_problem(v, inner) is not None), None)
        return None if bad is None else f"takes {describe(tp)} ({fmt(bad)} is not {describe(inner)})"
    if origin in (dict, typing.Dict) or tp is dict:
        return None if isinstance(value, Mapping) else f"takes {describe(tp)}"
    return None


def _check_anllm_keys(trainer: Mapping[str, Any]) -> None:
    resume = trainer.get("resume", "auto")
    if resume is None:
        resume = "never"
    if str(resume) not in RESUME_WORDS and not Path(str(resume)).expanduser().is_dir():
        raise ConfigError(
            f"trainer.resume={resume!r}: use auto (newest complete checkpoint in output_dir), never, "
            "or the path of an existing checkpoint directory."
        )
    limit = trainer.get("save_total_limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"trainer.save_total_limit={limit!r} must be null (keep all) or an integer >= 1.")
    bf16 = trainer.get("bf16", False)
    if isinstance(bf16, str) and bf16.lower() != "auto" or not isinstance(bf16, (str, bool)):
        raise ConfigError(f"trainer.bf16={bf16!r}: use true, false or auto.")
    from ..train.distill import DistillConfig

    DistillConfig.from_dict(trainer.get("distill"))


def check_trainer(trainer: Mapping[str, Any]) -> None:
    """``trainer``: TrainingArguments' field names and types, anllm's own keys, then TrainingArguments
    built from it (its own checks), without side effects."""
    types_ = training_argument_types()
    allowed = set(types_) | set(ANLLM_TRAINER_KEYS)
    for key in trainer:
        if key not in allowed:
            raise ConfigError(
                f"trainer.{key} is not a transformers.TrainingArguments field.{close(key, allowed)} "
                "See `python -c \"import transformers; help(transformers.TrainingArguments)\"`."
            )
    for key in ("output_dir", "deepspeed"):
        if key in trainer:
            raise ConfigError(f"trainer.{key} is set from the top-level `{key}` config; set {key}=... instead.")
    _check_anllm_keys(trainer)
    if trainer.get("remove_unused_columns"):
        raise ConfigError(
            "trainer.remove_unused_columns=true would drop document_ids (the packed-document boundaries the "
            "model's AnSAN mask needs). Leave it false."
        )
    for key, value in trainer.items():
        if key in ANLLM_TRAINER_KEYS or (key == "bf16" and isinstance(value, str)):
            continue
        problem = type_problem(value, types_[key])
        if problem:
            raise ConfigError(f"trainer.{key}={fmt(value)}: {problem}" + ("" if problem.endswith((".", "?")) else
                              f" (transformers.TrainingArguments.{key}).")) from None
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        v = trainer.get(key, 1)
        if v < 1:
            raise ConfigError(f"trainer.{key}={v!r} must be an integer >= 1.")
    build_training_arguments(trainer)


@functools.lru_cache(maxsize=1)
def _check_class() -> type:
    from transformers import TrainingArguments

    class ConfigCheckArguments(TrainingArguments):
        """TrainingArguments whose __post_init__ skips the device set-up (framework != "pt")."""

        framework = "anllm-config-check"

    return ConfigCheckArguments


def build_training_arguments(trainer: Mapping[str, Any]) -> Any:
    """``TrainingArguments`` from the section as the run builds them (anllm.train.runner), for its own
    checks only: no directory is created, no device, process group or DeepSpeed is touched, and the
    environment is left as it was."""
    t = {k: v for k, v in trainer.items() if k not in ANLLM_TRAINER_KEYS}
    if isinstance(t.get("bf16"), str):  # auto: resolved on the training machine
        t["bf16"] = False
    t.update(
        output_dir=os.path.join(tempfile.gettempdir(), "anllm-config-check-never-created"),
        deepspeed=None, remove_unused_columns=False, include_num_input_tokens_seen="non_padding",
        save_total_limit=None, report_to=t.get("report_to") or "none",
    )
    env = dict(os.environ)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _check_class()(**t)
    except (ValueError, TypeError, KeyError, NotImplementedError, AssertionError) as e:
        msg = first_line(str(e))
        named = sorted((k for k in trainer if k in msg.replace("--", "")), key=len, reverse=True)
        if named:
            raise ConfigError(f"trainer.{named[0]}={fmt(trainer[named[0]])}: transformers.TrainingArguments "
                              f"refuses it: {msg.rstrip('.')}.") from None
        raise ConfigError(f"trainer: transformers.TrainingArguments refuses this section: {msg.rstrip('.')}.") from None
    finally:
        for k in set(os.environ) - set(env):
            del os.environ[k]
        for k, v in env.items():
            if os.environ.get(k) != v:
                os.environ[k] = v


# ---- deepspeed ------------------------------------------------------------------------------------

DEEPSPEED_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "data_types",
    "gradient_clipping", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "aio",
    "activation_checkpointing", "sparse_attention", "steps_per_print", "wall_clock_breakdown", "dump_state",
    "memory_breakdown", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "elasticity", "autotuning",
    "data_efficiency", "curriculum_learning", "compression_training", "checkpoint", "pipeline", "hybrid_engine",
    "compile", "weight_quantization", "quantize_training", "eigenvalue", "progressive_layer_drop", "nebula", "timers",
    "use_data_before_expert_parallelism", "dataloader_drop_last", "disable_allgather", "graph_harvesting",
    "vocabulary_size", "expert_parallel", "sequence_parallel_size", "tensor_parallel",
)
ZERO_KEYS = (
    "stage", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "use_multi_rank_bucket_allreduce",
    "allgather_partitions", "allgather_bucket_size", "overlap_comm", "load_from_fp32_weights", "elastic_checkpoint",
    "offload_param", "offload_optimizer", "cpu_offload", "cpu_offload_param", "cpu_offload_use_pin_memory",
    "sub_group_size", "prefetch_bucket_size", "stage3_prefetch_bucket_size", "param_persistence_threshold",
    "stage3_param_persistence_threshold", "model_persistence_threshold", "stage3_model_persistence_threshold",
    "max_live_parameters", "stage3_max_live_parameters", "max_reuse_distance", "stage3_max_reuse_distance",
    "gather_16bit_weights_on_model_save", "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save", "module_granularity_threshold", "stage3_module_granularity_threshold",
    "use_all_reduce_for_fetch_params", "stage3_use_all_reduce_for_fetch_params", "allgather_sequential",
    "stage3_allgather_sequential", "ignore_unused_parameters", "legacy_stage1", "round_robin_gradients",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients", "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply",
    "log_trace_cache_warnings", "enable_sanity_checks", "leaf_module", "compute_grad_norm", "parameter_alignment",
    "mics_shard_size", "mics_hierarchical_params_gather", "save_muon_momentum_buffer_in_memory", "zenflow",
)
OFFLOAD_KEYS = {
    "offload_optimizer": ("device", "nvme_path", "buffer_count", "pin_memory", "pipeline_read", "pipeline_write",
                          "fast_init", "ratio", "super_offload", "cpuadam_cores_perc", "pipeline"),
    "offload_param": ("device", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu", "pin_memory"),
}


def check_deepspeed(ds: Any) -> None:
    """A structural check of the ``deepspeed`` section (see the module doc)."""
    if not ds:
        return
    if not isinstance(ds, Mapping) or "zero_optimization" not in ds:
        raise ConfigError(
            "deepspeed: a DeepSpeed config needs a zero_optimization section (pick deepspeed=zero2|zero3|zero3_offload)."
        )
    for key in ds:
        if key not in DEEPSPEED_KEYS:
            raise ConfigError(f"Unknown key deepspeed.{key}: not a DeepSpeed config key.{close(key, DEEPSPEED_KEYS)} "
                              "See https://www.deepspeed.ai/docs/config-json/.")
    for section in ("fp16", "bf16", "bfloat16"):
        enabled = (ds.get(section) or {}).get("enabled") if isinstance(ds.get(section), Mapping) else None
        if enabled is not None and enabled not in (True, False, "auto"):
            raise ConfigError(f"deepspeed.{section}.enabled={fmt(enabled)}: use true, false or auto.")
    zero = ds["zero_optimization"]
    if not isinstance(zero, Mapping):
        raise ConfigError(f"deepspeed.zero_optimization={fmt(zero)} is not a section with a stage.")
    for key in zero:
        if key not in ZERO_KEYS:
            raise ConfigError(f"Unknown key deepspeed.zero_optimization.{key}: not a DeepSpeed ZeRO option."
                              f"{close(key, ZERO_KEYS)}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage={fmt(stage)}: choose one of 0, 1, 2, 3.")
    for name, keys in OFFLOAD_KEYS.items():
        off = zero.get(name)
        if off is None:
            continue
        if not isinstance(off, Mapping):
            raise ConfigError(f"deepspeed.zero_optimization.{name}={fmt(off)} is not a section (device, pin_memory, ...).")
        for key in off:
            if key not in keys:
                raise ConfigError(f"Unknown key deepspeed.zero_optimization.{name}.{key}: {name} takes "
                                  f"{', '.join(keys)}.{close(key, keys)}")
        device = off.get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            raise ConfigError(f"deepspeed.zero_optimization.{name}.device={fmt(device)}: choose one of none, cpu, nvme.")
        if name == "offload_param" and device != "none" and stage != 3:
            raise ConfigError(f"deepspeed.zero_optimization.offload_param needs stage 3 (stage={stage}).")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "deepspeed=zero*: the deepspeed package is not installed. Install the extra "
            "(pip install -e '.[deepspeed]') or use deepspeed=none."
        )
