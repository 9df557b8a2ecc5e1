"""Text -> token ids with anchors, then fixed-size blocks with document ids.

AC insertion and tokenisation run as a batched ``datasets.map`` (parallel over ``num_proc``
workers); packing is one sequential, vectorised pass because a block may span map batches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

import numpy as np

from ..anchors import AC_TOKEN, AnchorConfig, Marking, ac_token_id

IGNORE_INDEX = -100


def check_anchor_tokenizer(tokenizer: Any, anchor: AnchorConfig | None) -> None:
    """The tokenizer must know the model's anchor token, with the same id, before any data is made."""
    if anchor is None or anchor.mode != "ac":
        return
    token = anchor.anchor_token or AC_TOKEN
    tid = ac_token_id(tokenizer, token)
    if [tid] != list(anchor.anchor_token_ids):
        raise ValueError(
            f"The tokenizer maps {token!r} to id {tid} but the anchor config says {anchor.anchor_token_ids}. "
            "Use the tokenizer returned by anllm.prepare_model for this model."
        )


def require_eos(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            "The tokenizer has no eos_token, so documents cannot be ended. Set tokenizer.eos_token "
            "(e.g. to the model's end-of-text token) before building the data."
        )
    return int(eos)


# --- where anchors go in text (pretraining and SFT mark text the same way) ---------------------------


def anchor_token_for(anchor: AnchorConfig | None) -> str | None:
    """The literal token to insert (AC), or None (EP/none: text stays as it is)."""
    if anchor is None or anchor.mode != "ac":
        return None
    return anchor.anchor_token or AC_TOKEN


def marking_for(anchor: AnchorConfig | None, splitter: str | None = None) -> Marking | None:
    """How text is marked for ``anchor`` (None unless AC), with an optional splitter override."""
    marking = anchor.marking() if anchor is not None else None
    if marking is not None and splitter:
        marking = replace(marking, splitter=splitter)
    return marking


def mark_sentences(text: str, marking: Marking | None) -> str:
    """``<AC>`` after every sentence of ``text`` as ``marking`` says (unchanged when None)."""
    return text if marking is None else marking.apply(text)



@dataclass
class TextProcessor:
    """Batched map function: insert ``<AC>`` after every sentence (AC), tokenise, end with EOS.

    BOS is added exactly when the tokenizer adds it by itself (``add_special_tokens=True``), so
    training matches how the model is prompted later. Literal anchor strings already present in the
    text are removed first: only the splitter decides where anchors go.
    Returns ``input_ids`` plus per-document counts (``n_anchors``, ``n_sentences``) for the stats.
    """

    tokenizer: Any
    anchor: AnchorConfig | None
    text_column: str = "text"
    splitter: str | None = None  # None: the anchor config's

    def __post_init__(self) -> None:
        self.eos_id = require_eos(self.tokenizer)
        self.mode = self.anchor.mode if self.anchor is not None else "none"
        self.token = (self.anchor.anchor_token or AC_TOKEN) if self.mode == "ac" else None
        self.marking = marking_for(self.anchor, self.splitter)
        self.anchor_ids = frozenset(self.anchor.anchor_token_ids) if self.anchor is not None else frozenset()

    def prepare_text(self, text: str) -> tuple[str, int]:
        """(text with anchors inserted, number of sentences found; -1 when not split)."""
        if self.marking is None:
            return text, -1
        marked = self.marking.apply(text)
        return marked, marked.count(self.marking.token)

    def count_anchors(self, ids: list[int]) -> int:
        if not self.anchor_ids:
            return 0
        return sum(1 for t in ids if t in self.anchor_ids)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.text_column not in batch:
            raise ValueError(
                f"The data has no column {self.text_column!r}; its columns are {sorted(batch)}. "
                "Set data.text_column to one of them."
            )
        texts, sentences = [], []
        for text in batch[self.text_column]:
            if not isinstance(text, str):
                text = ""
            marked, n = self.prepare_text(text)
            texts.append(marked)
            sentences.append(n)
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        ids_out, anchors = [], []
        for ids, text in zip(encoded, texts):
            if not text.strip():
                ids = []  # empty documents are dropped later (and counted)
            elif not ids or ids[-1] != self.eos_id:
                ids = list(ids) + [self.eos_id]
            ids_out.append(ids)
            anchors.append(self.count_anchors(ids))
        return {"input_ids": ids_out, "n_anchors": anchors, "n_sentences": sentences}


# --- packing -----------------------------------------------------------------------------------


def pack_documents(
    docs: Iterable[np.ndarray], block_size: int, keep_remainder: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Concatenate documents and cut them into blocks of ``block_size`` tokens.

    Each block carries ``document_ids``: 0 for the first (possibly partial) document in the block,
    +1 at every later document start, so the AnSAN mask never lets a token see another document.
    ``labels`` equal ``input_ids`` (the model shifts them) except at the first token of every
    document after the first in the block (-100): predicting an unrelated document's start from the
    previous one is noise. The last, shorter block is yielded only with ``keep_remainder``.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    buf: list[np.ndarray] = []
    doc_buf: list[np.ndarray] = []
    buffered = 0
    doc_no = 0
    carry_ids = np.zeros(0, dtype=np.int64)
    carry_doc = np.zeros(0, dtype=np.int64)

    def cut(ids: np.ndarray, doc: np.ndarray, final: bool) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        n_full = len(ids) // block_size
        out = [_block(ids[i * block_size : (i + 1) * block_size], doc[i * block_size : (i + 1) * block_size])
               for i in range(n_full)]
        rest_ids, rest_doc = ids[n_full * block_size :], doc[n_full * block_size :]
        if final and keep_remainder and len(rest_ids):
            out.append(_block(rest_ids, rest_doc))
        return rest_ids, rest_doc, out

    for ids in docs:
        if len(ids) == 0:
            continue
        buf.append(np.asarray(ids, dtype=np.int64))
        doc_buf.append(np.full(len(ids), doc_no, dtype=np.int64))
        doc_no += 1
        buffered += len(ids)
        if buffered >= 64 * block_size:
            carry_ids, carry_doc, blocks = cut(
                np.concatenate([carry_ids, *buf]), np.concatenate([carry_doc, *doc_buf]), final=False
            )
            yield from blocks
            buf, doc_buf, buffered = [], [], len(carry_ids)
    _, _, blocks = cut(np.concatenate([carry_ids, *buf]), np.concatenate([carry_doc, *doc_buf]), final=True)
    yield from blocks


def _block(ids: np.ndarray, doc: np.ndarray) -> dict[str, np.ndarray]:
    doc = doc - doc[0]
    labels = ids.copy()
    starts = np.flatnonzero(doc[1:] != doc[:-1]) + 1
    labels[starts] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "document_ids": doc}


def truncate_document(ids: list[int], block_size: int) -> dict[str, list[int]]:
    """The authors' no-packing mode: one document per example, cut to ``block_size`` (collator pads)."""
    ids = list(ids[:block_size])
    return {"input_ids": ids, "labels": list(ids), "document_ids": [0] * len(ids)}
