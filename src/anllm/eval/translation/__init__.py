"""Translation suite: WMT De→En with the authors' Alpaca prompt, greedy decoding, BLEU/chrF/COMET, C⇓, MaxKV.

Reproduces the paper's Table 2 layout: per method one row with quality (BLEU, chrF, COMET-DA) and
cache use: ``c_red`` (C⇓ = 1 − kept/seen keys/values at the end of each sentence, summed over
sentences), ``max_kv`` (MaxKV: the peak number of keys/values held while translating one sentence,
averaged over sentences, as the paper defines it) and ``tokens_per_s``. Methods: ``full``,
``anchor+src`` (AnSAN, source cache kept), ``anchor`` (AnSAN, source cache dropped), and ``ansan``
(AnSAN with a full cache, the losslessness reference); see :mod:`anllm.eval.generation`.

The prompt is the standard Alpaca ``prompt_input`` template with the instruction "Translate the
following sentences from German to English.", built by the SFT code itself so evaluation matches
training: AC models get the anchor token after every sentence of the template's preamble, of the
instruction and of the source (split like training with :func:`anllm.insert_anchor_token`); it is
stripped from the outputs. EP models use the plain prompt (their anchors are the sentence-final
punctuation already in it).

``translation.hypotheses=FILE`` (or a list) scores existing system outputs with the same metrics,
without generating, so external systems land in the same table.

The package: :mod:`.testsets` (test sets, hypothesis files), :mod:`.prompts` (the prompt and the
output line), :mod:`.decode` (:func:`translate`: one method over a test set) and :mod:`.suite` (the
suite glue, metrics rows, output files, plots); every public name is importable from here.
"""

from __future__ import annotations

from .decode import TranslationRun, sampling_processor, translate
from .prompts import (
    PROMPT_FORMATS, SRC_CACHE, build_chat_prompt, build_prompt, clean_output, source_span, token_mask,
)
from .suite import DEFAULT_METHODS, SUITE, check, evaluate_translation, run_task
from .testsets import TASKS, hypothesis_files, load_hypotheses, load_test_set, system_name

__all__ = [
    "DEFAULT_METHODS", "PROMPT_FORMATS", "SRC_CACHE", "SUITE", "TASKS", "TranslationRun", "build_chat_prompt",
    "build_prompt", "check", "clean_output", "evaluate_translation", "hypothesis_files", "load_hypotheses",
    "load_test_set", "run_task", "sampling_processor", "source_span", "system_name", "token_mask", "translate",
]
