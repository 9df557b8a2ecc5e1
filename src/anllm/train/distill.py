"""Distillation from full attention: a dense teacher signal for the anchors (``trainer.distill``).

Plain LM loss gives the anchors one weak signal per token; trained KV compressors that beat a window
(KV-Distill, DMS) learn from the uncompressed model's distribution instead. With ``weight=λ`` the loss
per scored token is ``(1 − λ)·CE + λ·T²·KL(teacher ‖ student)`` at temperature ``T``, where the
teacher reads the same rows with *full* attention (causal within each packed document):

* ``teacher: start`` — a frozen copy of the starting model (built exactly as the student is, so it
  is partitioned like the student under ZeRO-3), in the compute dtype, never trained;
* ``teacher: self`` — the student's current weights with the anchor mask off, under ``no_grad``
  (no second copy of the weights; the target moves as the model learns);
* ``teacher: <dir>`` — any HF checkpoint with the student's vocabulary.

Scored tokens are the CE's (labels != -100 after the shift). Normalisation follows the Trainer's: with
``num_items_in_batch`` (gradient accumulation) the KL is summed and divided by it exactly as the CE
is, so accumulation 2 × batch 1 equals batch 2.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from .errors import ConfigError

TEACHERS = ("start", "self")


@dataclass(frozen=True)
class DistillConfig:
    weight: float = 0.0
    temperature: float = 1.0
    teacher: str = "start"

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "DistillConfig":
        """Validated settings; errors name the key (``trainer.distill.*``) and what is allowed."""
        d = dict(d or {})
        unknown = sorted(set(d) - {"weight", "temperature", "teacher"})
        if unknown:
            raise ConfigError(f"trainer.distill.{unknown[0]} is unknown: use weight, temperature, teacher.")
        weight, temp, teacher = d.get("weight", 0.0), d.get("temperature", 1.0), d.get("teacher", "start")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= float(weight) <= 1.0:
            raise ConfigError(f"trainer.distill.weight={weight!r} must be a number in [0, 1] (0 = off, 1 = KL only).")
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or float(temp) <= 0:
            raise ConfigError(f"trainer.distill.temperature={temp!r} must be a number > 0.")
        teacher = str(teacher)
        if teacher not in TEACHERS and not Path(teacher).expanduser().is_dir():
            raise ConfigError(f"trainer.distill.teacher={teacher!r}: use start (frozen starting model), self "
                              "(current weights, full attention) or the directory of an HF checkpoint.")
        return cls(float(weight), float(temp), teacher)


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float,
    num_items_in_batch: Any = None,
) -> torch.Tensor:
    """``T²·KL(teacher ‖ student)`` over the scored positions (``labels`` shifted as the CE shifts them),
    summed and divided by ``num_items_in_batch`` when given, else averaged."""
    scored = labels[:, 1:] != -100
    s = student_logits[:, :-1][scored].float() / temperature
    t = teacher_logits[:, :-1][scored].float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") * temperature**2
    if num_items_in_batch is not None:
        denom = num_items_in_batch.to(kl.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        return kl / denom
    return kl / scored.sum().clamp_min(1)


class Teacher:
    """Produces the teacher's logits for a batch; keeps the time spent (the distillation's cost)."""

    def __init__(self, cfg: DistillConfig, model: Any | None):
        self.cfg = cfg
        self.model = model  # None: the student itself (teacher=self)
        self.seconds = 0.0
        self.calls = 0
        self._placed = model is None

    def place(self, args: Any, deepspeed_config: dict[str, Any] | None) -> None:
        """Put a separate teacher where the student computes, once, at the first step (after the
        Trainer has finalised DeepSpeed's config): under ZeRO-3 an optimizer-less engine keeps it
        partitioned like the student; otherwise a plain copy on the device in the compute dtype."""
        if self._placed:
            return
        self._placed = True
        stage = int(((deepspeed_config or {}).get("zero_optimization") or {}).get("stage", 0))
        if deepspeed_config and stage == 3:
            self.model = _deepspeed_inference(self.model, deepspeed_config)
            return
        dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else None)
        self.model = self.model.to(device=args.device, dtype=dtype) if dtype else self.model.to(args.device)

    @torch.no_grad()
    def logits(self, student: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
        from ..modeling import anchor_attention, is_anchor_aware

        model = self.model if self.model is not None else student
        keys = ("input_ids", "attention_mask", "document_ids")
        batch = {k: inputs[k] for k in keys if k in inputs and inputs[k] is not None}
        sync = torch.cuda.synchronize if batch["input_ids"].is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        plain = _unwrap(model)
        with anchor_attention(plain, enabled=False) if is_anchor_aware(plain) else contextlib.nullcontext():
            out = model(**batch, use_cache=False).logits
        sync()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def build_teacher(cfg: DistillConfig, run_cfg: dict[str, Any], student: Any, tokenizer: Any, args: Any) -> Teacher:
    """The teacher for ``cfg`` (see the module docstring). ``start`` is built by the same code as the
    student (same weights, same new ``<AC>`` row), so under ZeRO-3 it is partitioned like the student."""
    if cfg.teacher == "self":
        return Teacher(cfg, None)
    if cfg.teacher == "start":
        from .model import build_model_and_tokenizer

        teacher, _ = build_model_and_tokenizer(run_cfg)
    else:
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(str(Path(cfg.teacher).expanduser()),
                                                       attn_implementation=student.config._attn_implementation)
    t_vocab, s_vocab = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if getattr(teacher.get_output_embeddings().weight, "ds_shape", None) is not None:  # ZeRO-3 partitioned
        t_vocab = teacher.get_output_embeddings().weight.ds_shape[0]
        s_vocab = student.get_output_embeddings().weight.ds_shape[0]
    if t_vocab != s_vocab:
        raise ConfigError(f"trainer.distill.teacher={cfg.teacher}: its vocabulary has {t_vocab} rows, the student's "
                          f"{s_vocab} (tokenizer {len(tokenizer)}); a teacher must share the student's vocabulary.")
    teacher.requires_grad_(False)
    teacher.eval()
    return Teacher(cfg, teacher)


def _deepspeed_inference(model: Any, ds_config: dict[str, Any]) -> Any:
    """A ZeRO-3 engine without optimizer around the frozen teacher: its parameters stay partitioned
    and are gathered layer by layer in its forward, as the student's are."""
    import copy

    import deepspeed

    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config["gradient_accumulation_steps"] = 1
    config.pop("train_batch_size", None)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)

