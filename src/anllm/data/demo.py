"""An offline English corpus that needs nothing beside the repo: the Python Language Reference.

CPython ships the reference's topic pages as plain text (``pydoc_data.topics``, used by ``help()``),
about 0.5 MB of edited English prose. Each topic becomes one document; grammar rules, code examples,
signatures and headings' underlines are dropped and hard-wrapped paragraphs are unwrapped, so what
is left is sentences a splitter can find. Nothing is copied into the repository.
"""

from __future__ import annotations

import re
from typing import Iterator

_UNDERLINE = re.compile(r"^([*=\-~^#])\1{2,}\s*$")
_FOOTNOTE_REF = re.compile(r"\s?\[\d+\]")
_CODE_MARKERS = ("::=", ">>>", "...:")
_ENDERS = ".!?:"
_ITEM = re.compile(r"^\s*(?:[*\-•]|\d+\.|\[\d+\])\s+")
_CLOSERS = "\"')]”’"
MIN_DOC_CHARS = 200
_MIN_DEDUP_CHARS = 40  # shorter paragraphs (headings) may repeat


def _is_prose(paragraph: str) -> bool:
    """A paragraph reads as prose: ends like a sentence and is mostly words, not code."""
    if any(m in paragraph for m in _CODE_MARKERS):
        return False
    core = paragraph.rstrip(_CLOSERS)
    if not core or core[-1] not in _ENDERS:
        return False
    wordy = sum(ch.isalpha() or ch.isspace() for ch in paragraph)
    return wordy / len(paragraph) >= 0.8


def clean_topic(text: str) -> str:
    """One topic page as prose paragraphs separated by blank lines (title first)."""
    paragraphs: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        if len(lines) == 2 and _UNDERLINE.match(lines[1]):  # a heading: keep its title
            paragraphs.append(lines[0].strip())
            continue
        if lines[0].lstrip().startswith("-[") and lines[0].rstrip().endswith("]-"):  # "-[ Footnotes ]-"
            continue
        # Prose has one indentation (a list item's continuation lines may hang); code is ragged.
        rest = lines[1:] if _ITEM.match(lines[0]) else lines
        if len({len(ln) - len(ln.lstrip()) for ln in rest}) > 1:
            continue
        body = " ".join(ln.strip() for ln in lines)
        body = _FOOTNOTE_REF.sub("", body).strip()
        body = re.sub(r"\s+", " ", body)
        if _is_prose(body):
            paragraphs.append(body)
    # Drop headings left without any prose after them.
    keep = [p for i, p in enumerate(paragraphs) if _is_prose(p) or (i + 1 < len(paragraphs) and _is_prose(paragraphs[i + 1]))]
    return "\n\n".join(keep)


def demo_documents() -> Iterator[str]:
    """The reference's topics (sorted by name) as cleaned documents of at least 200 characters.

    Many topics repeat whole paragraphs of others (``attribute-access`` and ``customization`` share
    dozens), so a paragraph already used by an earlier topic is dropped: otherwise a held-out
    document would be partly trained on.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - stripped-down Python builds
        raise RuntimeError(
            "This Python has no pydoc_data (the help() texts), so the demo corpus is unavailable; "
            "use data=jsonl with your own files."
        ) from e
    seen: set[str] = set()
    for name in sorted(topics):
        kept = []
        for para in clean_topic(topics[name]).split("\n\n"):
            if len(para) >= _MIN_DEDUP_CHARS and para in seen:
                continue
            seen.add(para)
            kept.append(para)
        doc = "\n\n".join(kept)
        if len(doc) >= MIN_DOC_CHARS:
            yield doc
