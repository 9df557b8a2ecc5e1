"""Alpaca-format SFT examples (instruction tuning and De->En translation), with anchors for AC models.

Prompts use the standard Alpaca templates. For AnLLM-AC (``template="anllm"``), ``<AC>`` goes where
pretraining put it: after every sentence (found by the same splitter, :class:`anllm.anchors.Marking`) of

* the template's preamble ("Below is an instruction ... a task[, paired with ...].<AC> Write a
  response that appropriately completes the request.<AC>"),
* the instruction, the input (e.g. the German source, sentence by sentence) and the response.

The "### Instruction:/### Input:/### Response:" headers get none. The response's last sentence
gets one too (the model learns to emit it), then EOS. ``template="paper"`` is the authors' placement
(see :func:`build_alpaca_prompt`). AnLLM-EP and plain models get the templates unchanged.
Evaluation must build prompts with :func:`build_alpaca_prompt` so they match training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..anchors import AnchorConfig, Marking
from .processing import IGNORE_INDEX, anchor_token_for, mark_sentences, marking_for, require_eos

PREAMBLE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
PREAMBLE_NO_INPUT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
PROMPT_INPUT = "{preamble}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "{preamble}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
TEMPLATES = ("anllm", "paper")


def build_alpaca_prompt(instruction: str, input: str = "", marking: Marking | None = None, template: str = "anllm") -> str:
    """The Alpaca prompt (``prompt_input`` when ``input`` is non-empty), anchored for AC models.

    ``template="anllm"``: ``<AC>`` after every sentence of the preamble, instruction and input;
    "### Response:" + newline. ``"paper"`` (the authors): one ``<AC>`` after the whole preamble, one
    after the instruction and one after the input, whose own sentences are marked as in pretraining;
    the prompt ends with "### Response:" as in the original Alpaca template.
    """
    if template not in TEMPLATES:
        raise ValueError(f"SFT template {template!r}: choose one of {TEMPLATES}.")
    has_input = bool(input.strip())
    preamble = PREAMBLE_INPUT if has_input else PREAMBLE_NO_INPUT
    text = PROMPT_INPUT if has_input else PROMPT_NO_INPUT
    if template == "anllm":
        fill = lambda s: mark_sentences(s.strip(), marking)  # noqa: E731
        return text.format(preamble=fill(preamble), instruction=fill(instruction), input=fill(input))
    close = (lambda s: f"{s} {marking.token}") if marking is not None else (lambda s: s)  # noqa: E731
    parts = {"preamble": close(preamble), "instruction": close(instruction.strip()),
             "input": close(mark_sentences(input.strip(), marking))}
    return text.format(**parts).removesuffix("\n")


def build_alpaca_response(output: str, marking: Marking | None = None) -> str:
    return mark_sentences(output.strip(), marking)


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
    splitter: str | None = None  # None: the anchor config's
    template: str = "anllm"

    def __post_init__(self) -> None:
        self.eos_id = require_eos(self.tokenizer)
        self.token = anchor_token_for(self.anchor)
        self.marking = marking_for(self.anchor, self.splitter)
        self.anchor_ids = frozenset(self.anchor.anchor_token_ids) if self.anchor is not None else frozenset()

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        prompts, responses = [], []
        for ins, inp, out in zip(batch["instruction"], batch["input"], batch["output"]):
            prompts.append(build_alpaca_prompt(ins, inp or "", self.marking, self.template))
            responses.append(build_alpaca_response(out, self.marking))
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
