"""Build a training run's dataset cache ahead of the run, in a CPU job: ``python -m anllm.data build ...``.

It lives with the training code because it composes a training config and makes the run's tokenizer
the way training does (the data package stays below training and never imports it).

It takes the same Hydra overrides as ``train.py`` and builds exactly the cache entry that run will
look up (same data config, tokenizer with its anchor token, anchor settings, block size), without the
model's weights: the model is made on PyTorch's ``meta`` device, so a 7B tokenizer + anchor setup
takes seconds and no GPU memory. The training run then finds the entry and loads it (rank 0 does not
spend the first hours of a 32-GPU allocation tokenising, and no barrier times out meanwhile)::

    # on a CPU node (sbatch -p cpu -c 32 --mem 128G), with the cache on scratch:
    export ANLLM_CACHE=/scratch/$USER/anllm
    python -m anllm.data build +exp=anllm_ac scale=paper protocol=paper model=llama2_7b \\
        model.context_length=8192 data=redpajama_local preprocessing.num_proc=32
    # then the GPU job, with the same overrides (preprocessing.num_proc does not change the entry)

Streams (``kind: hub``) have nothing to build; the command says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Iterator, Mapping, Sequence

logger = logging.getLogger("anllm.data")  # the data pipeline's logger: its messages are about the data


def train_data_kwargs(c: Mapping[str, Any], seed: int, *, world_size: int | None = None,
                      num_workers: int = 0) -> dict[str, Any]:
    """The arguments ``anllm.train.runner`` passes to :func:`build_train_dataset` (besides tokenizer/anchor).

    Shared by the runner and :func:`prebuild` so both look up the same cache entry.
    """
    return {
        "data_cfg": {k: v for k, v in c["data"].items() if k != "id"},
        "block_size": c["block_size"],
        "cache_dir": os.path.expanduser(str(c["cache_dir"])),
        "seed": int(seed),
        "num_proc": int((c.get("preprocessing") or {}).get("num_proc") or 1),
        "max_model_length": c["model"]["context_length"],
        "world_size": world_size,
        "num_workers": int(num_workers or 0),
    }


def default_seed(c: Mapping[str, Any]) -> int:
    """``trainer.seed``, or the TrainingArguments default the run would use."""
    seed = (c.get("trainer") or {}).get("seed")
    if seed is not None:
        return int(seed)
    from transformers import TrainingArguments

    return int(TrainingArguments.__dataclass_fields__["seed"].default)


@contextlib.contextmanager
def _weightless_models() -> Iterator[None]:
    """``AutoModelForCausalLM.from_pretrained`` builds the model from its config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained

    def meta_from_pretrained(path: Any, *args: Any, **kwargs: Any) -> Any:
        config = AutoConfig.from_pretrained(path)
        extra = {k: kwargs[k] for k in ("attn_implementation",) if kwargs.get(k)}
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)

    AutoModelForCausalLM.from_pretrained = meta_from_pretrained  # type: ignore[method-assign]
    try:
        yield
    finally:
        AutoModelForCausalLM.from_pretrained = original  # type: ignore[method-assign]


def tokenizer_and_anchor(c: Mapping[str, Any]) -> tuple[Any, Any]:
    """The tokenizer and anchor config of the training run, made by the training code without weights."""
    from ..modeling import get_anchor_config
    from .model import build_model_and_tokenizer

    with _weightless_models():
        model, tok = build_model_and_tokenizer(c)
    return tok, get_anchor_config(model)


def train_config(overrides: Sequence[str]) -> Any:
    """The ``train.py`` config for ``overrides`` (composed as the CLI composes it, validated like a run)."""
    from ..schema import compose
    from .config import validate

    cfg = compose("train", overrides)
    validate(cfg)
    return cfg


def prebuild(overrides: Sequence[str]) -> Any:
    """Build (or find) the cache entry of the run ``train.py <overrides>`` would make; returns its DataStats."""
    from ..data import build_train_dataset
    from ..schema import plain_dict

    c = plain_dict(train_config(overrides))
    if c["data"].get("kind") == "hub":
        logger.info("data.kind=hub streams while training: nothing to build ahead (row counts of the stream's shards "
                    "are recorded under %s/streams as the run reads them).", c["cache_dir"])
        return None
    tok, anchor = tokenizer_and_anchor(c)
    kwargs = train_data_kwargs(c, default_seed(c))
    _, stats = build_train_dataset(tokenizer=tok, anchor=anchor, **kwargs)
    return stats


def main(overrides: Sequence[str]) -> int:
    stats = prebuild(overrides)
    if stats is not None:
        print(json.dumps(stats.to_dict(), indent=2))
        print(f"cache entry: {stats.cache_path} ({'already built' if stats.from_cache else 'built now'})")
    return 0
