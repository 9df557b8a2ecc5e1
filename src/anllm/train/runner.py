"""One training run from a composed config: validate, build, train, save.

The order is chosen for failure cost: config errors first (seconds), then TrainingArguments (they
register DeepSpeed so ZeRO-3 can partition weights while loading), the model, the data (rank 0
builds and caches it, the other ranks then load the cache), and finally the Trainer.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from .checkpoints import (
    AtomicCheckpointCallback,
    OutputDirLock,
    checkpoint_dirs,
    is_complete,
    latest_complete_checkpoint,
    numpy1_rng_states,
    quarantine_incomplete,
)
from ..schema.core import plain_dict
from . import heldout
from .config import ConfigError, resolve_bf16, validate
from .distributed import barrier, env_from_submitit, is_main_process
from .preemption import PreemptionCallback

logger = logging.getLogger("anllm.train")

RUN_FILE = "anllm_run.json"  # what this output_dir trains; resume refuses a different run
CONFIG_FILE = "anllm_train_config.yaml"
SUMMARY_FILE = "anllm_train_summary.json"
# Settings that define a run: resuming into an output_dir with other values would mix two runs.
IDENTITY_KEYS = ("exp_name", "block_size", "anchor", "model", "data")


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    train_loss: float | None
    resumed_from: str | None
    log_history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    data_stats: Any = None


def run(cfg: DictConfig, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Train as ``cfg`` says. ``callbacks`` are extra ``TrainerCallback`` objects (tests use them)."""
    validate(cfg)
    c = plain_dict(cfg)
    output_dir = Path(os.path.expanduser(c["output_dir"])).resolve()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".anllm_write_test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output_dir={c['output_dir']} cannot be written ({e.strerror or e}); choose a writable "
                          "directory with output_dir=...") from None
    env_from_submitit()
    if c["deepspeed"] and not _cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU (gloo); must precede its import
    _setup_reporting(c, output_dir)

    args, save_limit, resume = training_arguments(c, output_dir)
    lock = OutputDirLock(output_dir)
    if args.process_index == 0:
        try:
            lock.acquire()  # before resume looks at checkpoints another run may be writing
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
    try:
        return _run_locked(c, callbacks, output_dir, args, save_limit, resume)
    finally:
        lock.release()


def _run_locked(c: dict[str, Any], callbacks: Sequence[Any], output_dir: Path, args: Any,
                save_limit: int | None, resume: Any) -> TrainResult:
    resume_path = resolve_resume(resume, output_dir, args)
    _claim_output_dir(c, output_dir, resume_path, args)

    from datasets import IterableDataset

    from ..data import DataCollatorForAnchors, build_train_dataset, is_resumable, resume_stream
    from ..modeling import get_anchor_config
    from .distill import DistillConfig, build_teacher
    from .model import build_model_and_tokenizer
    from .prebuild import train_data_kwargs
    from .trainer import AnllmTrainer

    model, tok = build_model_and_tokenizer(c)
    distill = DistillConfig.from_dict(c["trainer"].get("distill"))
    teacher = build_teacher(distill, c, model, tok, args) if distill.enabled else None
    # Global, not per node: rank 0 builds (or finds) the cache entry, then every other rank loads it.
    with args.main_process_first(local=False, desc="building the training data"):
        ds, stats = build_train_dataset(
            tokenizer=tok, anchor=get_anchor_config(model),
            **train_data_kwargs(c, args.seed, world_size=args.world_size, num_workers=args.dataloader_num_workers),
        )
    if isinstance(ds, IterableDataset):  # a stream: each rank reads its own part (anllm.data.stream), not rank 0 for all
        args.accelerator_config.dispatch_batches = False
        if resume_path is not None and is_resumable(ds):
            done = json.loads((resume_path / "trainer_state.json").read_text())["global_step"]
            ds = resume_stream(ds, batches=int(done) * args.gradient_accumulation_steps,
                               batch_size=args.train_batch_size)
            args.ignore_data_skip = True  # the stream starts at the next row; the Trainer must not replay it
    trainer = AnllmTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=DataCollatorForAnchors(tok),
        processing_class=tok,
        callbacks=[PreemptionCallback(), AtomicCheckpointCallback(save_limit), *callbacks],
        block_size=c["block_size"],
        peak_tflops=(c.get("metrics") or {}).get("peak_tflops"),
        teacher=teacher,
    )
    check, skipped = heldout.settings(c, args.world_size)
    start = docs = None
    if check is None:
        logger.info(skipped)
    elif trainer.is_world_process_zero():
        docs = heldout.documents(c, check)
        start = heldout.start_numbers(model, tok, c, check, docs)  # before training: the starting model
    if resume_path:
        logger.info("Resuming from %s", resume_path)
    with numpy1_rng_states():
        out = trainer.train(resume_from_checkpoint=str(resume_path) if resume_path else None)
    trainer.save_model(str(output_dir))  # weights (ZeRO-3: gathered), config with anchor settings, tokenizer
    check_result = None
    if check is not None and trainer.is_world_process_zero():
        end = heldout.measure(model, tok, docs, check)
        check_result = {"start": start, "trained": end, "settings": check,
                        "evaluate_equivalent": heldout.ppl_config(c, check)}
        print(heldout.table(start, end), flush=True)
    result = TrainResult(
        output_dir=output_dir,
        global_step=int(trainer.state.global_step),
        train_loss=out.training_loss,
        resumed_from=str(resume_path) if resume_path else None,
        log_history=list(trainer.state.log_history),
        metrics=dict(out.metrics),
        data_stats=stats,
    )
    if trainer.is_world_process_zero():
        _write_summary(result, trainer, stats, check_result)
    barrier()
    return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def training_arguments(c: dict[str, Any], output_dir: Path) -> tuple[Any, int | None, Any]:
    """TrainingArguments from ``cfg.trainer`` plus what anllm needs; returns (args, save_total_limit, resume)."""
    from transformers import TrainingArguments

    t = dict(c["trainer"])
    resume = t.pop("resume", "auto")
    save_limit = t.pop("save_total_limit", None)
    t.pop("distill", None)  # anllm's own (anllm.train.distill), not a TrainingArguments field
    if t.get("remove_unused_columns"):
        raise ConfigError(
            "trainer.remove_unused_columns=true would drop document_ids (the packed-document boundaries the "
            "model's AnSAN mask needs). Leave it false."
        )
    t["bf16"] = resolve_bf16(t.get("bf16", False))
    t.setdefault("use_cpu", not _cuda())
    t.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    t.setdefault("run_name", f"{c['exp_name']}-{c['model']['name']}-{c['data'].get('id', c['data']['kind'])}")
    report = t.get("report_to") or "none"
    t.update(
        output_dir=str(output_dir),
        deepspeed=c["deepspeed"] or None,
        remove_unused_columns=False,  # keep document_ids for the model's forward
        include_num_input_tokens_seen="non_padding",
        save_total_limit=None,  # rotation is done after a checkpoint is complete (checkpoints.py)
        report_to=report,
    )
    return TrainingArguments(**t), save_limit, resume


def resolve_resume(resume: Any, output_dir: Path, args: Any) -> Path | None:
    """The checkpoint to continue from: ``auto`` = newest complete one (incomplete ones moved aside)."""
    mode = "never" if resume is None else str(resume)
    if mode == "never":
        complete = [p for _, p in checkpoint_dirs(output_dir) if is_complete(p)]
        if complete:
            raise ConfigError(
                f"trainer.resume=never but {output_dir} already holds checkpoints ({complete[-1].name}, ...). "
                "Use trainer.resume=auto to continue that run, or a new output_dir=... for a fresh one."
            )
        return None
    if mode == "auto":
        found = latest_complete_checkpoint(output_dir)
        with args.main_process_first(local=False, desc="setting aside incomplete checkpoints"):
            if args.process_index == 0:
                quarantine_incomplete(output_dir)
        return found
    path = Path(mode).expanduser().resolve()
    if not is_complete(path):
        raise ConfigError(
            f"trainer.resume={mode}: {path} is not a complete checkpoint (no marker file: its save was "
            "interrupted, or it was not written by anllm). Pick another checkpoint or trainer.resume=auto."
        )
    return path


def _identity(c: dict[str, Any]) -> dict[str, Any]:
    return {k: c.get(k) for k in IDENTITY_KEYS}


def _unset_dropped(x: Any) -> Any:
    """``x`` without null-valued mapping keys, so that an option added later with a null default (the
    behaviour before it existed) does not make an earlier run's output_dir refuse to resume."""
    if isinstance(x, dict):
        return {k: _unset_dropped(v) for k, v in x.items() if v is not None}
    return x


def _claim_output_dir(c: dict[str, Any], output_dir: Path, resume_path: Path | None, args: Any) -> None:
    """Record what this output_dir trains; refuse to resume a different run into it."""
    run_file = output_dir / RUN_FILE
    if resume_path is not None and run_file.is_file() and resume_path.parent == output_dir:
        saved = json.loads(run_file.read_text())
        mine = json.loads(json.dumps(_identity(c)))
        diff = sorted(k for k in IDENTITY_KEYS if _unset_dropped(saved.get(k)) != _unset_dropped(mine.get(k)))
        if diff:
            raise ConfigError(
                f"{output_dir} holds a run with different {', '.join(diff)} than this config, so resuming would mix "
                "two runs. Use another output_dir=..., or the same settings as before."
            )
    if args.process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(_identity(c), indent=2))
        OmegaConf.save(OmegaConf.create(c), output_dir / CONFIG_FILE)
        logger.info("Training config (also in %s):\n%s", output_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(c)))
    barrier()


def _setup_reporting(c: dict[str, Any], output_dir: Path) -> None:
    """wandb logs offline unless a key is configured, so a run never blocks on a login prompt."""
    report = c["trainer"].get("report_to") or []
    report = [report] if isinstance(report, str) else list(report)
    if not ({"wandb", "all"} & set(report)):
        return
    if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        if is_main_process():
            logger.info("No WANDB_API_KEY: wandb logs offline to %s/wandb (sync later with `wandb sync`).", output_dir)
    os.environ.setdefault("WANDB_PROJECT", str((c.get("wandb") or {}).get("project") or "anllm"))
    os.environ.setdefault("WANDB_DIR", str(output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)


def _write_summary(result: TrainResult, trainer: Any, stats: Any, check: dict[str, Any] | None = None) -> None:
    metrics = dict(result.metrics)
    runtime = metrics.get("train_runtime")
    tokens = int(trainer.state.num_input_tokens_seen)
    summary = {
        "global_step": result.global_step,
        "train_loss": result.train_loss,
        "resumed_from": result.resumed_from,
        "num_input_tokens_seen": tokens,
        "metrics": metrics,
        "data": stats.to_dict() if hasattr(stats, "to_dict") else None,
        "heldout": check,
    }
    if runtime:
        summary["tokens_per_second_overall"] = tokens / runtime if not result.resumed_from else None
    teacher = getattr(trainer, "teacher", None)
    if teacher is not None:
        extra = trainer.distill_seconds
        summary["distill"] = {
            **{k: getattr(teacher.cfg, k) for k in ("weight", "temperature", "teacher")},
            "teacher_forward_s": round(teacher.seconds, 3), "teacher_plus_kl_s": round(extra, 3),
            "train_runtime_s": runtime,
            # the step time with distillation over the step time without it (this run's own split)
            "step_cost_ratio": round(runtime / (runtime - extra), 3) if runtime and runtime > extra else None,
        }
        logger.info("distillation (teacher=%s, weight %.2f): teacher forward + KL took %.1f s of %.1f s of training "
                    "(step cost x%s vs the plain step)", teacher.cfg.teacher, teacher.cfg.weight, extra, runtime or 0,
                    summary["distill"]["step_cost_ratio"])
    (result.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str))
    logger.info("Saved the model, tokenizer and anchor settings to %s (load with anllm.from_pretrained).", result.output_dir)
