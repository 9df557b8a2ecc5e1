"""Distillation from full attention (trainer.distill): the loss, its normalisation, and real runs.

The expected numbers are computed independently: the teacher's and the student's logits from plain
forwards, the KL written out as sum p_t (log p_t - log p_s) over the scored tokens. CPU, ~1 min.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

import anllm
from anllm.testing import tiny_llama, word_tokenizer
from anllm.train import ConfigError, run
from anllm.train.config import validate
from anllm.train.distill import DistillConfig, Teacher, distill_kl
from anllm.train.trainer import AnllmTrainer
from test_train_run import tiny_cfg

EP_WORDS = [".", "!", "?", ","] + [f"w{i}" for i in range(120)]


def _manual_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, T: float) -> tuple[float, int]:
    """Summed T^2 KL(teacher || student) over scored positions, by the definition, and the count."""
    total, n = 0.0, 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            if labels[b, i + 1] == -100:
                continue
            pt = torch.softmax(teacher[b, i].double() / T, -1)
            ps = torch.softmax(student[b, i].double() / T, -1)
            total += float((pt * (pt.log() - ps.log())).sum()) * T * T
            n += 1
    return total, n


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_distill_kl_is_the_kl_over_scored_tokens(T: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, 2] = labels[1, 5] = labels[1, 0] = -100
    want, n = _manual_kl(s, t, labels, T)
    assert n == 2 * 5 - 2
    assert float(distill_kl(s, t, labels, T)) == pytest.approx(want / n, rel=1e-5)
    # with gradient accumulation the Trainer passes the token count of the whole optimizer step
    assert float(distill_kl(s, t, labels, T, torch.tensor(40))) == pytest.approx(want / 40, rel=1e-5)
    assert float(distill_kl(t, t, labels, T)) == pytest.approx(0.0, abs=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("weight", [0.3, 1.0])
def test_compute_loss_mixes_ce_and_kl_to_a_full_attention_teacher(tmp_path, weight: float) -> None:
    tok = word_tokenizer(EP_WORDS)
    student, _ = anllm.prepare_model(tiny_llama(), tok, "ep")
    teacher, _ = anllm.prepare_model(tiny_llama(), tok, "ep")  # same seed: the starting weights
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(7, 128, (2, 24), generator=g)
    ids[:, [5, 11, 17]] = 4  # anchors, so the student's AnSAN view differs from the teacher's
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch["labels"][1, :3] = -100
    cfg = DistillConfig(weight=weight, temperature=1.0, teacher="start")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = AnllmTrainer(model=student, args=args, teacher=Teacher(cfg, teacher))
    got = float(trainer.compute_loss(student, dict(batch)))

    ce = float(student(**batch).loss)  # AnSAN (the student's own rule)
    with anllm.anchor_attention(teacher, enabled=False):
        t_logits = teacher(input_ids=ids).logits  # full causal attention
    kl, n = _manual_kl(student(input_ids=ids).logits, t_logits, batch["labels"], 1.0)
    assert kl / n > 1e-3  # the two views really differ
    assert got == pytest.approx((1 - weight) * ce + weight * kl / n, rel=1e-4)
    assert trainer.teacher.calls == 1 and trainer.distill_seconds > 0


def test_teacher_self_reads_the_current_weights_without_the_mask(tmp_path) -> None:
    tok = word_tokenizer(EP_WORDS)
    student, _ = anllm.prepare_model(tiny_llama(), tok, "ep")
    ids = torch.randint(7, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    ids[0, [4, 9]] = 4
    t = Teacher(DistillConfig(0.5, 1.0, "self"), None).logits(student, {"input_ids": ids})
    with torch.no_grad(), anllm.anchor_attention(student, enabled=False):
        want = student(input_ids=ids).logits
    torch.testing.assert_close(t, want)
    assert not t.requires_grad


DISTILL = ("block_size=64", "trainer.max_steps=2", "trainer.learning_rate=1e-3", "trainer.warmup_steps=0",
           "trainer.save_steps=100", "trainer.distill.weight=0.5", "trainer.distill.temperature=2.0",
           "trainer.gradient_checkpointing=false")


def test_accumulation_2x1_equals_batch_2_with_distillation(tmp_path, data_cache) -> None:
    """The KL is normalised like the CE, so accumulation does not change the update (packed rows)."""
    a = run(tiny_cfg(tmp_path / "b2", data_cache, "anllm_ac", *DISTILL, "trainer.per_device_train_batch_size=2",
                     "trainer.gradient_accumulation_steps=1"))
    b = run(tiny_cfg(tmp_path / "a2", data_cache, "anllm_ac", *DISTILL, "trainer.per_device_train_batch_size=1",
                     "trainer.gradient_accumulation_steps=2"))
    assert a.global_step == b.global_step == 2
    wa, wb = load_file(tmp_path / "b2" / "model.safetensors"), load_file(tmp_path / "a2" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    la = [h["loss"] for h in a.log_history if "loss" in h]
    lb = [h["loss"] for h in b.log_history if "loss" in h]
    assert la == pytest.approx(lb, rel=1e-4)
    # ... and differs from plain CE training: the teacher is really used
    c = run(tiny_cfg(tmp_path / "ce", data_cache, "anllm_ac", *DISTILL, "trainer.distill.weight=0",
                     "trainer.per_device_train_batch_size=2"))
    lc = [h["loss"] for h in c.log_history if "loss" in h]
    assert abs(la[0] - lc[0]) > 1e-3
    summary = json.loads((tmp_path / "b2" / "anllm_train_summary.json").read_text())
    d = summary["distill"]
    assert d["weight"] == 0.5 and d["teacher"] == "start" and d["teacher_forward_s"] > 0
    assert d["step_cost_ratio"] is not None and d["step_cost_ratio"] > 1.0
    assert "distill" not in json.loads((tmp_path / "ce" / "anllm_train_summary.json").read_text())


@pytest.mark.parametrize("override, key", [
    ("trainer.distill.weight=1.5", "trainer.distill.weight"),
    ("trainer.distill.weight=-0.1", "trainer.distill.weight"),
    ("trainer.distill.weight=abc", "trainer.distill.weight"),
    ("trainer.distill.temperature=0", "trainer.distill.temperature"),
    ("trainer.distill.teacher=/no/such/teacher", "trainer.distill.teacher"),
    ("+trainer.distill.lambda=0.5", "trainer.distill.lambda"),
    ("anchor.window=-1", "anchor.window"),
    ("anchor.window=1.5", "anchor.window"),
])
def test_bad_distill_and_window_values_name_the_key(tmp_path, data_cache, override: str, key: str) -> None:
    from hydra.errors import ConfigCompositionException

    # a wrong type (anchor.window=1.5) is refused while Hydra composes (the typed schema, anllm.schema)
    with pytest.raises((ConfigError, ConfigCompositionException), match=key.replace(".", r"\.")):
        validate(tiny_cfg(tmp_path / "out", data_cache, "anllm_ac", override))


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, data_cache) -> None:
    other = tiny_llama(vocab_size=96)
    other.save_pretrained(tmp_path / "teacher")
    cfg = tiny_cfg(tmp_path / "out", data_cache, "anllm_ac", *DISTILL, f"trainer.distill.teacher={tmp_path / 'teacher'}")
    with pytest.raises(ConfigError, match=r"trainer\.distill\.teacher=.*vocabulary"):
        run(cfg)
    assert not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("distill-data-cache")

