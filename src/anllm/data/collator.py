"""Batching for anchor-aware training: right padding that keeps padding out of loss and attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .processing import IGNORE_INDEX


@dataclass
class DataCollatorForAnchors:
    """Pad rows to the longest (optionally a multiple of ``pad_to_multiple_of``) on the right.

    Returns ``input_ids``, ``attention_mask`` (1 = token), ``labels`` (-100 on padding; copied from
    ``input_ids`` when rows carry none) and, when rows carry them, ``document_ids`` (-1 on padding)
    for the anchor-aware model's forward. All are ``torch.long``.
    """

    tokenizer: Any
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = IGNORE_INDEX
    document_pad_id: int = -1

    def __post_init__(self) -> None:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)  # masked out anyway
        self.pad_id = int(pad) if pad is not None else 0
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty batch.")
        with_docs = ["document_ids" in f for f in features]
        if any(with_docs) and not all(with_docs):
            raise ValueError("Some rows have document_ids and some do not; do not mix packed and unpacked data.")
        lengths = [len(f["input_ids"]) for f in features]
        if min(lengths) == 0:
            raise ValueError("A row has no tokens; empty rows cannot be trained on.")
        width = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        B = len(features)
        out = {
            "input_ids": torch.full((B, width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((B, width), dtype=torch.long),
            "labels": torch.full((B, width), self.label_pad_token_id, dtype=torch.long),
        }
        if all(with_docs):
            out["document_ids"] = torch.full((B, width), self.document_pad_id, dtype=torch.long)
        for i, f in enumerate(features):
            n = lengths[i]
            for key in ("labels", "document_ids", "attention_mask"):
                if f.get(key) is not None and len(f[key]) != n:
                    raise ValueError(f"Row {i}: {key} has {len(f[key])} entries but input_ids has {n}.")
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            out["input_ids"][i, :n] = ids
            if "attention_mask" in f:
                out["attention_mask"][i, :n] = torch.as_tensor(f["attention_mask"], dtype=torch.long)
            else:
                out["attention_mask"][i, :n] = 1
            labels = f.get("labels")
            out["labels"][i, :n] = ids if labels is None else torch.as_tensor(labels, dtype=torch.long)
            if "document_ids" in out:
                out["document_ids"][i, :n] = torch.as_tensor(f["document_ids"], dtype=torch.long)
        return out
