"""Alpaca-format SFT examples (instruction tuning and De->En translation), with anchors for AC models.

Prompts use the standard Alpaca templates. For AnLLM-AC, ``<AC>`` goes where pretraining put it:
after every sentence (found by the same splitter, :func:`anllm.insert_anchor_token`) of

* the template's preamble ("Below is an instruction ... a task[, paired with ...].<AC> Write a
  response that appropriately completes the request.<AC>"),
* the instruction, the input (e.g. the German source, sentence by sentence) and the response.

The "### Instruction:/### Input:/### Response:" headers get none. The response's last sentence
gets one too (the model learns to emit it), then EOS. AnLLM-EP and plain models get the templates
unchanged. Evaluation must build prompts with :func:`build_alpaca_prompt` so they match training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..anchors import AC_TOKEN, AnchorConfig, insert_anchor_token
from .processing import IGNORE_INDEX, require_eos

PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
PREAMBLE_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
PROMPT_INPUT = "{preamble}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "{preamble}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def anchor_token_for(anchor: AnchorConfig | None) -> str | None:
    """The literal token to insert (AC), or None (EP/none: text stays as it is)."""
    if anchor is None or anchor.mode != "ac":
        return None
    return anchor.anchor_token or AC_TOKEN


def mark_sentences(text: str, token: str | None, splitter: str = "blingfire") -> str:
    """``token`` after every sentence of ``text`` (none when ``token`` is None)."""
    if token is None:
        return text
    return insert_anchor_token(text.replace(token, ""), token=token, splitter=splitter, after_last=True)  # type: ignore[arg-type]


def build_alpaca_prompt(
    instruction: str, input: str = "", anchor_token: str | None = None, splitter: str = "blingfire"
) -> str:
    """The Alpaca prompt (``prompt_input`` when ``input`` is non-empty), anchored for AC models."""
    fill = lambda s: mark_sentences(s.strip(), anchor_token, splitter)  # noqa: E731
    if input.strip():
        return PROMPT_INPUT.format(preamble=fill(PREAMBLE_INPUT), instruction=fill(instruction), input=fill(input))
    return PROMPT_NO_INPUT.format(preamble=fill(PREAMBLE_NO_INPUT), instruction=fill(instruction))


def build_alpaca_response(output: str, anchor_token: str | None = None, splitter: str = "blingfire") -> str:
    return mark_sentences(output.strip(), anchor_token, splitter)


@dataclass
class SFTProcessor:
    """Batched map function: prompt + response -> ``input_ids``/``labels`` (loss on the response only).

    ``input_ids = tok(prompt, add_special_tokens=True) + tok(response) + [EOS]``; ``labels`` are -100
    over the prompt. Examples longer than ``block_size`` keep their prompt and lose the response's
    tail; examples whose prompt alone fills ``block_size`` come back empty (dropped and counted).
    """

    tokenizer: Any
    anchor: AnchorConfig | None
    block_size: int
    splitter: str = "blingfire"

    def __post_init__(self) -> None:
        self.eos_id = require_eos(self.tokenizer)
        self.token = anchor_token_for(self.anchor)
        self.anchor_ids = frozenset(self.anchor.anchor_token_ids) if self.anchor is not None else frozenset()

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        prompts, responses = [], []
        for ins, inp, out in zip(batch["instruction"], batch["input"], batch["output"]):
            prompts.append(build_alpaca_prompt(ins, inp or "", self.token, self.splitter))
            responses.append(build_alpaca_response(out, self.token, self.splitter))
        p_ids = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        r_ids = self.tokenizer(responses, add_special_tokens=False)["input_ids"]
        rows: dict[str, list] = {"input_ids": [], "labels": [], "n_tokens": [], "n_anchors": [], "n_sentences": [],
                                 "truncated": [], "status": []}
        for p, r, prompt, response in zip(p_ids, r_ids, prompts, responses):
            r = list(r) + [self.eos_id]
            ids = list(p) + r
            n_sent = (prompt.count(self.token) + response.count(self.token)) if self.token else -1
            rows["n_tokens"].append(len(ids))
            rows["n_anchors"].append(sum(1 for t in ids if t in self.anchor_ids))
            rows["n_sentences"].append(n_sent)
            if len(p) >= self.block_size:
                rows["input_ids"].append([])
                rows["labels"].append([])
                rows["truncated"].append(False)
                rows["status"].append(f"prompt of {len(p)} tokens fills block_size {self.block_size}")
                continue
            labels = [IGNORE_INDEX] * len(p) + r
            rows["truncated"].append(len(ids) > self.block_size)
            rows["input_ids"].append(ids[: self.block_size])
            rows["labels"].append(labels[: self.block_size])
            rows["status"].append("")
        return rows
