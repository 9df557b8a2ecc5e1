"""What preprocessing did, in numbers: kept and skipped documents, tokens, anchors and throughput.

Training logs show these so a run that silently lost half its data (or whose sentence splitter found
no sentences) is noticed before the GPU hours are spent.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger("anllm.data")

MAX_SKIP_EXAMPLES = 20


@dataclass
class DataStats:
    """Counts and rates of one dataset build (rates are those measured when it was built)."""

    kind: str = ""
    split: str = "train"
    mode: str = "none"  # anchor mode the data was made for
    documents: int = 0  # documents (SFT: examples) kept
    tokens: int = 0  # tokens after tokenisation (BOS/EOS/anchors included), before packing/truncation
    anchors: int = 0  # anchor tokens among those (AC: <AC>; EP: sentence-ending punctuation tokens)
    sentences: int | None = None  # sentences found by the splitter (AC only; None when not split)
    rows: int = 0  # rows of the dataset (packed blocks or examples)
    row_tokens: int = 0  # tokens in the rows
    loss_tokens: int = 0  # tokens whose label is not -100
    dropped_tokens: int = 0  # tokens lost: packing remainder, truncated tails
    truncated: int = 0  # documents/examples cut to block_size
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_examples: list[str] = field(default_factory=list)  # first few "where: reason"
    seconds: float = 0.0  # wall time of the whole build
    stage_seconds: dict[str, float] = field(default_factory=dict)
    num_proc: int = 1
    block_size: int = 0
    from_cache: bool = False
    cache_path: str | None = None
    streaming: bool = False

    # -- bookkeeping -------------------------------------------------------------------------
    def skip(self, reason: str, where: str = "") -> None:
        """Count one skipped document; remember where the first few were."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.skipped_examples) < MAX_SKIP_EXAMPLES:
            self.skipped_examples.append(f"{where}: {reason}" if where else reason)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    # -- rates -------------------------------------------------------------------------------
    def _rate(self, n: int) -> float | None:
        return n / self.seconds if self.seconds > 0 else None

    @property
    def docs_per_s(self) -> float | None:
        return self._rate(self.documents)

    @property
    def tokens_per_s(self) -> float | None:
        return self._rate(self.tokens)

    @property
    def anchors_per_s(self) -> float | None:
        return self._rate(self.anchors)

    @property
    def anchor_density(self) -> float | None:
        """Tokens per anchor (the average 'sentence' length the cache keeps one entry for)."""
        return self.tokens / self.anchors if self.anchors else None

    # -- I/O ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("docs_per_s", "tokens_per_s", "anchors_per_s", "anchor_density"):
            d[name] = getattr(self, name)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataStats":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "DataStats":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> str:
        def f(x: float | None, spec: str = ",.0f") -> str:
            return "n/a" if x is None else format(x, spec)

        src = "cache" if self.from_cache else ("stream" if self.streaming else "built")
        parts = [
            f"data[{self.kind}/{self.split}, {self.mode}, {src}]",
            f"docs={self.documents:,}",
            f"tokens={self.tokens:,}",
            f"anchors={self.anchors:,}",
            f"sentences={'n/a' if self.sentences is None else format(self.sentences, ',')}",
            f"tokens/anchor={f(self.anchor_density, '.1f')}",
            f"rows={self.rows:,}",
            f"loss_tokens={self.loss_tokens:,}",
            f"dropped_tokens={self.dropped_tokens:,}",
            f"truncated={self.truncated:,}",
            f"skipped={self.num_skipped:,}{' ' + str(self.skipped) if self.skipped else ''}",
            f"build {self.seconds:.1f}s with num_proc={self.num_proc}:",
            f"{f(self.docs_per_s)} docs/s, {f(self.tokens_per_s)} tokens/s, {f(self.anchors_per_s)} anchors/s",
        ]
        return " ".join(parts)

    def log(self, log: logging.Logger = logger) -> None:
        log.info(self.summary())
        if self.skipped:
            log.warning("Skipped %d documents %s; first: %s", self.num_skipped, self.skipped, self.skipped_examples[:5])


def timed(stats: DataStats, stage: str) -> Callable[[float], None]:
    """``done(t0)`` records the seconds since ``t0`` as ``stats.stage_seconds[stage]``."""
    def done(t0: float) -> None:
        stats.stage_seconds[stage] = round(time.perf_counter() - t0, 4)

    return done
