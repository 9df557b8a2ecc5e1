"""Training data for AnLLM: documents -> `<AC>`-anchored, tokenised, packed, cached datasets.

``build_train_dataset`` (see :mod:`anllm.data.build`) is the entry point (``python -m anllm.data
build <train.py overrides>`` runs it ahead of a run); streams resume with ``resume_stream``
(:mod:`anllm.data.stream`); ``DataCollatorForAnchors`` batches its rows for the Trainer; ``DataStats``
reports what preprocessing did. SFT prompts for evaluation come from :func:`build_alpaca_prompt` so
they match training exactly.

One job per module: sources (where documents come from), split (the held-out split), processing
(anchors, tokens, blocks), sft (prompts), pretrain / sft_dataset / hub (building each kind), arrow
(Arrow I/O), store (the dataset cache on disk), stats, stream, retry, collator, demo.
"""

from .build import build_train_dataset
from .hub import process_stream
from .stream import is_resumable, resume_stream
from .split import held_out_documents
from .collator import DataCollatorForAnchors
from .demo import demo_documents
from .processing import IGNORE_INDEX, TextProcessor, pack_documents
from .sft import build_alpaca_prompt, build_alpaca_response
from .stats import DataStats

__all__ = [
    "IGNORE_INDEX",
    "DataCollatorForAnchors",
    "DataStats",
    "TextProcessor",
    "build_alpaca_prompt",
    "build_alpaca_response",
    "build_train_dataset",
    "demo_documents",
    "held_out_documents",
    "is_resumable",
    "pack_documents",
    "process_stream",
    "resume_stream",
]
