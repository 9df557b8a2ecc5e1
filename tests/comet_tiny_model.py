"""Build the tiny real COMET model the translation tests score with; runs INSIDE the COMET environment.

Why a script: COMET (unbabel-comet 2.2.7) lives in its own environment (``.venv-comet``, made by
``make install``), so the test process cannot import it; the tests run this file by path with that
environment's Python. The model is a real ``RegressionMetric`` (random tiny XLM-R encoder saved
locally, head trained for a few steps with COMET's own Lightning loop), fully offline, written in the
layout ``comet`` downloads (``DIR/hparams.yaml`` + ``DIR/checkpoints/model.ckpt``). Its construction is
deterministic (a fixed vocabulary, seeded initialisation and training), so every build scores the
segments below as recorded in ``tests/data/comet_tiny_fixture.json``.

    .venv-comet/bin/python tests/comet_tiny_model.py OUT_DIR
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

# The fixed segments the fixture records (the first three are the original in-process test's).
SEGMENTS = [
    {"src": "Der Hund läuft.", "mt": "The dog runs.", "ref": "The dog runs."},
    {"src": "Ein Haus am See.", "mt": "A cat.", "ref": "A house by the lake."},
    {"src": "Der See.", "mt": "The lake.", "ref": "The lake."},
    {"src": "Der Hund läuft schnell zum Haus am See.", "mt": "The dog runs quickly to the house.",
     "ref": "The dog runs fast to the house by the lake."},
    {"src": "Ein Hund.", "mt": "A house by the lake.", "ref": "A dog."},
]


def build(root: Path) -> Path:
    """Write the tiny COMET model directory to ``root`` (created) and return it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import pytorch_lightning as pl
    import torch
    import yaml
    from comet.models import RegressionMetric
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    enc = root / "encoder"
    texts = ["Der Hund läuft schnell.", "The dog runs fast.", "Ein Haus am See.", "A house by the lake."]
    # A fixed Unigram vocabulary (whole words, then single characters as the fallback): training one
    # with UnigramTrainer gives a different vocabulary on every run, and then different scores.
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    words = sorted({"\u2581" + w for t in texts for w in t.split()})
    chars = sorted(set("".join(texts).replace(" ", "")) | {"\u2581"})
    vocab = [(p, 0.0) for p in specials] + [(p, -2.0) for p in words] + [(c, -5.0) for c in chars]
    tk = Tokenizer(models.Unigram(vocab, unk_id=specials.index("<unk>"), byte_fallback=False))
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    xtok = XLMRobertaTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )
    xtok.save_pretrained(enc)
    cfg = XLMRobertaConfig(
        vocab_size=len(xtok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=514, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    torch.manual_seed(0)
    XLMRobertaModel(cfg, add_pooling_layer=False).save_pretrained(enc)
    train = root / "train.csv"
    rows = [
        {"src": "Der Hund läuft schnell.", "mt": "The dog runs fast.", "ref": "The dog runs fast.", "score": 0.9},
        {"src": "Ein Haus am See.", "mt": "A dog.", "ref": "A house by the lake.", "score": 0.1},
    ] * 4
    with open(train, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["src", "mt", "ref", "score"])
        w.writeheader()
        w.writerows(rows)
    model = RegressionMetric(
        pretrained_model=str(enc), local_files_only=True, hidden_sizes=[16], batch_size=4,
        train_data=[str(train)], validation_data=[str(train)], nr_frozen_epochs=0, learning_rate=1e-3,
    )
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False,
    )
    pl.seed_everything(0, verbose=False)  # the sampler's order and dropout: the same model on every run
    trainer.fit(model)
    (root / "checkpoints").mkdir(exist_ok=True)
    trainer.save_checkpoint(root / "checkpoints" / "model.ckpt")
    with open(root / "hparams.yaml", "w") as f:
        yaml.safe_dump({**dict(model.hparams), "class_identifier": "regression_metric"}, f)
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    print(build(Path(sys.argv[1])))
