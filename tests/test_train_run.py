"""Real training runs of train.py's pipeline on model=tiny (CPU, about 1-2 min in total).

Covers: a few steps of each pretraining exp overfitting one batch, the saved model reloading with its
anchor settings and tokenizer, document_ids reaching the model through the Trainer, resume after a
crash matching an uninterrupted run, and an interrupted save never being resumed from.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

import anllm
from anllm.train import ConfigError, run
from anllm.train.checkpoints import MARKER, QUARANTINE, checkpoint_dirs, is_complete, latest_complete_checkpoint, rotate
from anllm.schema import CONF_DIR

ONE_DOC = (
    "The river rose in the night. By morning the bridge was gone! Farmers watched from the hill. "
    "Nobody knew how long the water would stay. The school was closed for a week. "
    "Children played in the mud? Their parents carried sandbags to the church."
)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("anllm-data-cache")


@pytest.fixture(scope="session")
def one_doc(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("one-doc") / "one.jsonl"
    path.write_text(json.dumps({"text": ONE_DOC}) + "\n")
    return path


def tiny_cfg(out: Path, cache: Path, exp: str = "anllm_ac", *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=[f"+exp={exp}", "model=tiny", "data=demo", f"output_dir={out}", f"cache_dir={cache}",
                       "trainer.report_to=none", "trainer.disable_tqdm=true", *overrides],
        )


def losses(result) -> list[float]:
    return [h["loss"] for h in result.log_history if "loss" in h]


# --- a few real steps per exp ----------------------------------------------------------------------


@pytest.mark.parametrize("exp, mode", [("anllm_ac", "ac"), ("anllm_ep", "ep"), ("baseline", "none")])
def test_overfits_one_batch_and_saves_a_loadable_model(tmp_path, data_cache, one_doc, exp, mode):
    out = tmp_path / "out"
    cfg = tiny_cfg(
        out, data_cache, exp, "data=jsonl", f"data.paths=[{one_doc}]", "block_size=32",
        "trainer.max_steps=40", "trainer.learning_rate=3e-3", "trainer.warmup_steps=0", "trainer.save_steps=20",
        "trainer.lr_scheduler_type=constant_with_warmup",  # memorising needs the lr to stay up
        f"trainer.gradient_checkpointing={'true' if mode == 'ac' else 'false'}",
        "metrics.peak_tflops=0.001",  # MFU is logged on GPUs; a given peak makes it testable on CPU
    )
    result = run(cfg)
    loss = losses(result)
    assert result.global_step == 40 and len(loss) == 40
    assert all(math.isfinite(x) for x in loss)
    assert sum(loss[-5:]) / 5 < 0.5 * sum(loss[:5]) / 5, loss  # memorises its few rows
    logged = [h for h in result.log_history if "loss" in h][1:]
    assert all(h["tokens_per_second"] > 0 and h["mfu"] > 0 for h in logged)

    model, tok = anllm.from_pretrained(str(out))
    acfg = anllm.get_anchor_config(model)
    assert acfg is not None and acfg.mode == mode
    assert anllm.is_anchor_aware(model) == (mode != "none")
    if mode == "ac":
        assert acfg.anchor_token_ids == [tok.convert_tokens_to_ids("<AC>")]
        assert len(tok) == model.get_input_embeddings().weight.shape[0]
    if mode == "ep":
        assert tok.convert_tokens_to_ids(".") in acfg.anchor_token_ids
    # The final model is the last step's weights, and the last checkpoint is complete.
    last = latest_complete_checkpoint(out)
    assert last is not None and last.name == "checkpoint-40"
    final, ckpt = load_file(out / "model.safetensors"), load_file(last / "model.safetensors")
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)
    # It still computes a sensible loss on text it memorised.
    ids = tok(anllm.insert_anchor_token(ONE_DOC) if mode == "ac" else ONE_DOC, return_tensors="pt")["input_ids"][:, :32]
    with torch.no_grad():
        assert model(input_ids=ids, labels=ids).loss.item() < loss[0]
    summary = json.loads((out / "anllm_train_summary.json").read_text())
    assert summary["global_step"] == 40 and summary["data"]["mode"] == mode


def test_document_ids_reach_the_model_through_the_trainer(tmp_path, data_cache):
    """The Trainer keeps the collator's document_ids (remove_unused_columns would drop them) and the
    loss it computes depends on them: tokens do not attend across packed documents."""
    from anllm.data import DataCollatorForAnchors, build_train_dataset
    from anllm.schema import plain_dict
    from anllm.train.model import build_model_and_tokenizer
    from anllm.train.runner import training_arguments
    from anllm.train.trainer import AnllmTrainer

    c = plain_dict(tiny_cfg(tmp_path / "out", data_cache, "anllm_ac", "block_size=256"))
    args, _, _ = training_arguments(c, tmp_path / "out")
    model, tok = build_model_and_tokenizer(c)
    ds, _ = build_train_dataset({k: v for k, v in c["data"].items() if k != "id"}, tok, anllm.get_anchor_config(model),
                                256, data_cache)
    trainer = AnllmTrainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorForAnchors(tok),
                           processing_class=tok, block_size=256)
    batch = next(b for b in trainer.get_train_dataloader() if len(torch.unique(b["document_ids"])) > 1)
    model.eval()
    with torch.no_grad():
        with_docs = trainer.compute_loss(model, dict(batch))
        without = trainer.compute_loss(model, {k: v for k, v in batch.items() if k != "document_ids"})
    assert not torch.allclose(with_docs, without)


# --- resume --------------------------------------------------------------------------------------


class CrashAt(TrainerCallback):
    """Simulates a crash/preemption right after optimizer step ``step`` (before anything is saved)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated preemption")
        return control


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        return control


RESUME = ("block_size=64", "trainer.max_steps=6", "trainer.save_steps=3", "trainer.learning_rate=1e-3",
          "trainer.warmup_steps=2")


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, data_cache):
    full = run(tiny_cfg(tmp_path / "full", data_cache, "anllm_ac", *RESUME))

    cfg = tiny_cfg(tmp_path / "crash", data_cache, "anllm_ac", *RESUME)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        run(cfg, callbacks=[CrashAt(4)])
    assert latest_complete_checkpoint(tmp_path / "crash").name == "checkpoint-3"
    counter = CountSteps()
    resumed = run(cfg, callbacks=[counter])  # trainer.resume=auto is the default
    assert resumed.resumed_from.endswith("checkpoint-3") and resumed.global_step == 6
    assert counter.steps == 3  # it continued; it did not start over

    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "crash" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert losses(full)[3:] == pytest.approx(losses(resumed)[-3:], rel=1e-5, abs=1e-6)


def as_written_under_numpy1(rng_file: Path) -> None:
    """Rewrite a checkpoint's RNG file the way numpy 1 pickles it (numpy.core, not numpy._core)."""
    with zipfile.ZipFile(rng_file) as z:
        entries = {name: z.read(name) for name in z.namelist()}
    pkl = next(name for name in entries if name.endswith("data.pkl"))
    assert b"numpy._core.multiarray" in entries[pkl]
    entries[pkl] = entries[pkl].replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    with zipfile.ZipFile(rng_file, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)


def test_a_checkpoint_written_under_numpy1_resumes(tmp_path, data_cache):
    """Checkpoints from before the numpy 2 switch (#17) must still resume: the Trainer's weights-only
    load of rng_state.pth refuses numpy 1's name for the array constructor unless we allow it."""
    cfg = tiny_cfg(tmp_path / "crash", data_cache, "anllm_ac", *RESUME)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        run(cfg, callbacks=[CrashAt(4)])
    rng_file = tmp_path / "crash" / "checkpoint-3" / "rng_state.pth"
    as_written_under_numpy1(rng_file)
    with pytest.raises(pickle.UnpicklingError, match="numpy.core.multiarray._reconstruct"):
        torch.load(rng_file)  # what the Trainer's own allowlist meets
    counter = CountSteps()
    resumed = run(cfg, callbacks=[counter])
    assert resumed.resumed_from.endswith("checkpoint-3") and resumed.global_step == 6 and counter.steps == 3


def test_an_interrupted_save_is_never_resumed_from(tmp_path, data_cache, monkeypatch):
    out = tmp_path / "out"
    cfg = tiny_cfg(out, data_cache, "anllm_ep", *RESUME)
    original, calls = Trainer._save_rng_state, []

    def dies_on_second_save(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:  # checkpoint-6: weights and optimizer are written, then the process dies
            raise KeyboardInterrupt("killed while saving")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(Trainer, "_save_rng_state", original)
    half = out / "checkpoint-6"
    assert (half / "model.safetensors").is_file() and not is_complete(half)
    assert latest_complete_checkpoint(out).name == "checkpoint-3"

    resumed = run(cfg)
    assert resumed.resumed_from.endswith("checkpoint-3") and resumed.global_step == 6
    assert [p.name.split(".")[0] for p in (out / QUARANTINE).iterdir()] == ["checkpoint-6"]
    assert is_complete(out / "checkpoint-6")


def test_resume_refuses_to_mix_runs(tmp_path, data_cache):
    out = tmp_path / "out"
    run(tiny_cfg(out, data_cache, "anllm_ac", "block_size=32", "trainer.max_steps=1"))
    with pytest.raises(ConfigError, match="different anchor"):
        run(tiny_cfg(out, data_cache, "anllm_ep", "block_size=32", "trainer.max_steps=2"))
    with pytest.raises(ConfigError, match="trainer.resume=never but"):
        run(tiny_cfg(out, data_cache, "anllm_ac", "block_size=32", "trainer.resume=never"))


def test_rotation_keeps_only_complete_checkpoints(tmp_path):
    for step, done in [(10, True), (20, True), (30, False), (40, True)]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if done:
            (d / MARKER).write_text("{}")
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-40"
    rotate(tmp_path, keep=2)
    assert [p.name for _, p in checkpoint_dirs(tmp_path)] == ["checkpoint-20", "checkpoint-30", "checkpoint-40"]


def test_a_second_run_into_a_busy_output_dir_is_refused(tmp_path, data_cache):
    from anllm.train.checkpoints import OutputDirLock

    out = tmp_path / "out"
    held = OutputDirLock(out).acquire()  # as if another training process were writing there
    try:
        with pytest.raises(ConfigError, match="Another training run .*pid"):
            run(tiny_cfg(out, data_cache, "anllm_ac", "block_size=32", "trainer.max_steps=1"))
    finally:
        held.release()
    assert run(tiny_cfg(out, data_cache, "anllm_ac", "block_size=32", "trainer.max_steps=1")).global_step == 1


def test_accumulation_2x1_equals_batch_2(tmp_path, data_cache):
    """Gradient accumulation (the paper uses 16) is exact: 2 micro-batches of 1 row = 1 batch of 2 rows
    (packed rows of equal length), in the losses and the weights."""
    common = ("block_size=64", "trainer.max_steps=3", "trainer.learning_rate=1e-3", "trainer.warmup_steps=0",
              "trainer.save_steps=100", "trainer.gradient_checkpointing=false")
    a = run(tiny_cfg(tmp_path / "b2", data_cache, "anllm_ac", *common, "trainer.per_device_train_batch_size=2"))
    counter = CountSteps()
    b = run(tiny_cfg(tmp_path / "a2", data_cache, "anllm_ac", *common, "trainer.per_device_train_batch_size=1",
                     "trainer.gradient_accumulation_steps=2"), callbacks=[counter])
    assert a.global_step == b.global_step == counter.steps == 3
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)
    wa, wb = load_file(tmp_path / "b2" / "model.safetensors"), load_file(tmp_path / "a2" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
