"""lm-eval 0.4 model ``anllm``: an ``HFLM`` whose log-likelihoods come from :class:`MultiModeScorer`.

Only ``loglikelihood`` changes (multiple-choice tasks): requests are tokenised exactly as ``HFLM``
does (``_encode_pair``, empty context -> prefix token), grouped by context and scored in the chosen
``mode`` (``full``, ``ansan``, ``anchor`` or a baseline). Several ``AnchorLM`` objects can share one
scorer: the first evaluation computes every mode side by side (so timings are comparable) and the
others read the memoised results, so running lm-eval once per mode costs one pass.

AnLLM-AC models get ``<AC>`` after every sentence of the context and after each demonstration; the
query the answer continues (``Question: ...\\nAnswer:``, or the open last sentence when there is no
``Question:`` line) stays in the open segment, so every continuation token sees it whole plus the
anchors of everything before it. (Putting ``<AC>`` after the question would leave the answer only
the question's anchor.)

Also usable through lm-eval's own API once this module is imported (registration is by import):
``simple_evaluate(model="anllm", model_args="pretrained=DIR,mode=anchor", tasks=[...])``.
"""

from __future__ import annotations

import re
from typing import Any, Hashable

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from ..anchors import Marking, sentence_spans
from ..modeling import from_pretrained, get_anchor_config
from .methods import names
from .scoring import MultiModeScorer

_QUERY = re.compile(r"(?m)^Question:")


AC_LAYOUTS = ("sentence", "demonstration")


def anchor_qa_context(
    context: str, token: str | Marking, fewshot_delimiter: str = "\n\n", splitter: str = "blingfire",
    layout: str = "sentence",
) -> str:
    """Insert the AC anchor into an lm-eval context (demonstrations + the item's own text).

    ``layout="sentence"`` (ours): each demonstration gets an anchor after each of its sentences (so
    also after the demonstration); in the item, every sentence before the query gets one, the query
    itself none. ``layout="demonstration"`` (the authors' harness): one anchor after each
    demonstration, none inside demonstrations or the item. ``token`` is the anchor token, or a
    :class:`~anllm.anchors.Marking` (how the model's training text was marked).
    """
    marking = token if isinstance(token, Marking) else Marking(token, splitter)  # type: ignore[arg-type]
    if layout not in AC_LAYOUTS:
        raise ValueError(f"qa.ac_layout={layout!r}: choose one of {AC_LAYOUTS}.")
    parts = context.split(fewshot_delimiter)
    demos, item = parts[:-1], parts[-1]
    if layout == "demonstration":
        return fewshot_delimiter.join([f"{d} {marking.token}" if d.strip() else d for d in demos] + [item])
    splitter = marking.splitter
    out = [marking.apply(d) if d.strip() else d for d in demos]
    starts = [m.start() for m in _QUERY.finditer(item)]
    if starts:
        q = starts[-1]
    else:
        spans = sentence_spans(item, splitter=splitter)
        q = spans[-1][0] if spans else 0
    head = item[:q]
    out.append((marking.apply(head) if head.strip() else head) + item[q:])
    return fewshot_delimiter.join(out)


@register_model("anllm")
class AnchorLM(HFLM):
    """HFLM scoring multiple-choice requests with full attention, AnSAN or the anchor cache."""

    def __init__(
        self,
        pretrained: Any,
        tokenizer: Any = None,
        mode: str = "anchor",
        scorer: MultiModeScorer | None = None,
        batch_size: int | str = 1,
        insert_anchors: bool = True,
        fewshot_delimiter: str = "\n\n",
        num_sink_tokens: int = 4,
        ac_layout: str = "sentence",
        **kwargs: Any,
    ) -> None:
        if isinstance(pretrained, str):  # model_args string: load with the saved anchor settings re-applied
            import torch

            dtype = kwargs.pop("dtype", None)  # lm-eval's --model_args dtype=bfloat16 / --device cuda:1
            dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else None
            pretrained, tokenizer = from_pretrained(pretrained, **({"dtype": dtype} if dtype else {}))
            device = str(kwargs.get("device") or "cuda")
            if device.startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"  # lm-eval's CLI defaults to cuda:0; HFLM falls back the same way
            pretrained.to(device).eval()  # HFLM leaves a ready-made model where it is
        if batch_size == "auto" or str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by the anllm model: give a number (contexts per forward).")
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, batch_size=int(batch_size), **kwargs)
        self.mode = mode
        if scorer is None:
            modes = [mode] if mode in names("qa", kinds=("cache", "mask")) else ["anchor", mode]
            scorer = MultiModeScorer(
                self.model, modes, pad_token_id=self._pad_id(), batch_size=int(batch_size),
                num_sink_tokens=int(num_sink_tokens),
            )
        if mode not in scorer.modes:
            raise ValueError(f"mode {mode!r} is not one of the scorer's modes {scorer.modes}")
        self.scorer = scorer
        cfg = get_anchor_config(self.model)
        self.marking = cfg.marking() if (cfg is not None and insert_anchors) else None
        self.ac_token = self.marking.token if self.marking is not None else None
        self.ac_layout = ac_layout
        self.fewshot_delimiter = fewshot_delimiter

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for tid in (tok.pad_token_id, tok.eos_token_id, 0):
            if tid is not None:
                return int(tid)
        return 0

    def prepare_context(self, context: str) -> str:
        """The context as the model sees it (with ``<AC>`` for AC models)."""
        if self.marking is None or not context:
            return context
        return anchor_qa_context(context, self.marking, self.fewshot_delimiter, layout=self.ac_layout)

    def encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of ``(context, continuation)`` exactly as HFLM builds them, context left-truncated
        so that the scored sequence fits ``max_length``."""
        context = self.prepare_context(context)
        if context == "":
            ctx = [self.prefix_token_id]
            cont = self.tok_encode(continuation, add_special_tokens=False)
        else:
            ctx, cont = self._encode_pair(context, continuation)
        room = self.max_length + 1 - len(cont)
        if room < 1:
            raise ValueError(f"A continuation of {len(cont)} tokens does not fit max_length={self.max_length}.")
        return ctx[-room:], cont

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        reqs: list[tuple[Hashable, list[int], list[int]]] = []
        for req in requests:
            ctx, cont = req.args
            reqs.append(((ctx, cont), *self.encode_request(ctx, cont)))
        todo = sum(1 for key, _, _ in reqs if key not in self.scorer.memo[self.scorer.modes[0]])
        with tqdm(total=todo, desc=f"scoring ({', '.join(self.scorer.modes)})", disable=disable_tqdm or not todo) as bar:
            self.scorer.score(reqs, progress=bar)
        return [
            (s.logprob, s.greedy) for s in (self.scorer.result(self.mode, key) for key, _, _ in reqs)
        ]
