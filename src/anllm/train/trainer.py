"""``AnllmTrainer``: the HF Trainer with distillation from a teacher and throughput in every log line.

Both are documented override points of ``transformers.Trainer`` (``compute_loss``, ``log``); the
FLOPs and peak numbers behind the throughput come from :mod:`anllm.train.throughput`, the teacher
and the KL term from :mod:`anllm.train.distill`.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import Trainer, TrainerCallback

from .throughput import flops_per_token, gpu_peak_tflops


class AnllmTrainer(Trainer):
    """The HF Trainer plus throughput in every training log line (``log`` is a documented override point)."""

    def __init__(self, *args: Any, block_size: int = 0, peak_tflops: float | None = None, teacher: Any = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher = teacher  # anllm.train.distill.Teacher (trainer.distill.weight > 0) or None
        self.distill_seconds = 0.0  # teacher forward + KL, the distillation's extra cost
        self._block_size = block_size
        self._peak = gpu_peak_tflops(peak_tflops)
        self._flops_per_token: float | None = None
        self._last: tuple[float, int, int] | None = None  # (time, tokens, step) of the previous log
        self.add_callback(_StartClock(self))

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """CE, or ``(1 − λ)·CE + λ·T²·KL(teacher ‖ student)`` with distillation (:mod:`anllm.train.distill`)."""
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        from .distill import distill_kl

        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        self.teacher.place(self.args, plugin.deepspeed_config if plugin is not None else None)
        ce, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        t0 = time.perf_counter()
        teacher_logits = self.teacher.logits(model, inputs)
        kl = distill_kl(outputs.logits, teacher_logits, inputs["labels"], self.teacher.cfg.temperature, num_items_in_batch)
        if (self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None):
            kl = kl * self.accelerator.num_processes  # scaled as the Trainer scales the CE
        lam = self.teacher.cfg.weight
        loss = (1.0 - lam) * ce + lam * kl
        self.distill_seconds += time.perf_counter() - t0
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            self._add_throughput(logs)
        super().log(logs, start_time)

    def _add_throughput(self, logs: dict[str, float]) -> None:
        now, tokens, step = time.perf_counter(), int(self.state.num_input_tokens_seen), int(self.state.global_step)
        if self._last is None:
            return
        t0, tok0, step0 = self._last
        self._last = (now, tokens, step)
        dt, dtok, dstep = now - t0, tokens - tok0, step - step0
        if dt <= 0 or dstep <= 0:
            return
        world = max(1, int(self.args.world_size))
        tps = dtok / dt
        logs["tokens_per_second"] = round(tps, 2)
        logs["tokens_per_second_per_device"] = round(tps / world, 2)
        logs["seconds_per_step"] = round(dt / dstep, 4)
        if self._peak:
            if self._flops_per_token is None:
                self._flops_per_token = flops_per_token(self.model, self._block_size)
            logs["mfu"] = round(tps / world * self._flops_per_token / (self._peak * 1e12), 6)


class _StartClock(TrainerCallback):
    """Starts the throughput clock when training begins (after a resumed state has been loaded)."""

    def __init__(self, trainer: AnllmTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._last = (time.perf_counter(), int(state.num_input_tokens_seen), int(state.global_step))
        return control
