"""The schema of ``train.py``'s config (conf/train.yaml and its groups).

Compose-time (registered in Hydra's ConfigStore as ``base_train``, the first entry of
conf/train.yaml's defaults list): the top-level keys and the fixed-key sections ``anchor``,
``preprocessing``, ``heldout``, ``metrics``, ``wandb``, ``protocol``. Their fields are exactly the
keys of the YAML files, so the composed config is the same as without the schema, only typed:
``anchor.num_sink_tokens=abc`` fails while Hydra composes.

After compose (:func:`anllm.train.config.validate`, before any model or data is loaded): the
sections whose keys vary by option are checked against a schema chosen by the option — ``model``
(:class:`ModelSchema`, with ``tiny`` for the random tiny model) and ``data`` (one schema per
``kind``: :data:`DATA_SCHEMAS`); ``trainer`` mirrors ``transformers.TrainingArguments`` and
``deepspeed`` a DeepSpeed JSON (:mod:`anllm.schema.trainer`). Those sections are typed as plain
mappings at compose time because their optional keys (``data.holdout_fraction``, ...) must not be
added to configs that do not set them: the data cache key and the resume identity of a run are
made from these sections.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from .core import ConfigError, check_section, choices_text, close, fmt, spec

ANCHOR_MODES = ("ac", "ep", "none")
SPLITTERS = ("blingfire", "pysbd", "punkt")  # anllm.anchors.SPLITTERS (a test keeps them equal)
SFT_TEMPLATES = ("anllm", "paper")  # anllm.data.sft.TEMPLATES
DATA_KINDS = ("jsonl", "demo", "hub", "sft")  # anllm.data.build.KINDS
MODEL_SOURCES = ("smollm2", "tiny", "pretrained")
DTYPES = ("float32", "bfloat16", "float16")
# transformers' attention backends (eager + ALL_ATTENTION_FUNCTIONS); a hub kernel "org/name" is also accepted.
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                        "paged_attention", "sdpa_paged", "eager_paged")
NO_ANSAN_BACKENDS = ("flash_attention_2", "flash_attention_3", "paged_attention")


# ---- compose-time sections (fields == the YAML keys) ----------------------------------------------


@dataclass
class AnchorSchema:
    """``anchor``: passed to anllm.prepare_model."""

    mode: Optional[str] = spec(None, choices=ANCHOR_MODES, hint="the exp sets it")
    token: str = "<AC>"
    ep_punctuation: str = ".!?"
    num_sink_tokens: int = spec(0, ge=0, hint="0 = off")
    anchors_see_anchors: bool = False
    window: int = spec(0, ge=0, hint="0 = off")
    ep_tokens: Any = None  # an interpolation of protocol.ep_tokens: null or a list of strings
    ac_after_last: Optional[bool] = True
    ac_join: Optional[str] = None

    def check(self, key: str) -> None:
        if self.mode is None:
            raise ConfigError(f"{key}.mode=null: choose ac, ep or none (the exp sets it: +exp=...).")
        if self.ep_tokens is not None and (not isinstance(self.ep_tokens, list)
                                           or not all(isinstance(t, str) and t for t in self.ep_tokens)):
            raise ConfigError(f"{key}.ep_tokens={fmt(self.ep_tokens)}: use null (the EP rule) or a list of token "
                              "strings, e.g. ['.'].")
        if self.mode == "ep" and not self.ep_punctuation:
            raise ConfigError(f"{key}.ep_punctuation is empty: EP needs sentence-ending characters, e.g. '.!?'.")
        if self.mode == "ac" and not self.token:
            raise ConfigError(f"{key}.token is empty: AC needs the anchor token text, e.g. '<AC>'.")
        if self.mode == "ac" and self.ac_join is not None and str(self.token) not in str(self.ac_join):
            raise ConfigError(f"{key}.ac_join={self.ac_join!r} must contain the anchor token {self.token!r} "
                              "(the authors' join is ' <AC> ').")


@dataclass
class PreprocessingSchema:
    num_proc: int = spec(1, ge=1, hint="parallel workers for AC insertion + tokenisation")


@dataclass
class HeldoutSchema:
    """``heldout``: the held-out check at the end of training (anllm.train.heldout)."""

    enabled: Any = spec(False, choices=(True, False, "auto", None))
    num_documents: int = spec(8, ge=1)
    max_tokens: int = spec(512, ge=1)
    min_chars: int = spec(500, ge=0)
    chunk_size: int = spec(256, ge=1)


@dataclass
class MetricsSchema:
    peak_tflops: Optional[float] = spec(None, gt=0, hint="per-device peak TFLOP/s for MFU; null = from the GPU name")


@dataclass
class WandbSchema:
    project: Optional[str] = "anllm"


@dataclass
class ProtocolSchema:
    """``protocol`` (conf/protocol/*.yaml): the switches between our protocol and the authors'."""

    name: str = "anllm"
    packing: bool = True
    splitter: str = spec("blingfire", choices=SPLITTERS)
    ep_tokens: Optional[List[str]] = None
    ac_after_last: bool = True
    ac_join: Optional[str] = None
    sft_template: str = spec("anllm", choices=SFT_TEMPLATES)
    position_mode: str = spec("true", choices=("true", "compact"),
                              hint="on the command line quote true as a string: \"protocol.position_mode='true'\"")
    qa_ac_layout: str = spec("sentence", choices=("sentence", "demonstration"))
    src_cache: str = spec("prompt", choices=("prompt", "source"))
    decoding: str = spec("greedy", choices=("greedy", "paper"))
    max_new_tokens: int = spec(512, ge=1)
    translation_batch_size: Optional[int] = spec(None, ge=1)
    pad_vocab_multiple: Optional[int] = spec(None, ge=1)


@dataclass
class TrainSchema:
    """The root of conf/train.yaml (``base_train`` in Hydra's ConfigStore)."""

    exp_name: Optional[str] = None
    scale_name: Optional[str] = None
    output_dir: Optional[str] = None
    cache_dir: str = "~/.cache/anllm/datasets"
    block_size: Optional[int] = spec(None, ge=2, hint="tokens per training row")
    anchor: AnchorSchema = field(default_factory=AnchorSchema)
    preprocessing: PreprocessingSchema = field(default_factory=PreprocessingSchema)
    heldout: HeldoutSchema = field(default_factory=HeldoutSchema)
    metrics: MetricsSchema = field(default_factory=MetricsSchema)
    wandb: WandbSchema = field(default_factory=WandbSchema)
    # checked after compose: model/data by their own schemas, trainer/deepspeed by anllm.schema.trainer
    trainer: Dict[str, Any] = field(default_factory=dict)
    model: Dict[str, Any] = field(default_factory=dict)
    data: Dict[str, Any] = field(default_factory=dict)
    deepspeed: Dict[str, Any] = field(default_factory=dict)
    protocol: ProtocolSchema = field(default_factory=ProtocolSchema)


# ---- model (checked after compose) ----------------------------------------------------------------


@dataclass
class TinySchema:
    """``model.tiny``: the random tiny Llama (anllm.models.tiny)."""

    vocab_size: int = spec(1024, ge=300, hint="byte-level BPE: 256 bytes + merges + special tokens")
    hidden_size: int = spec(64, ge=1)
    num_layers: int = spec(2, ge=1)
    num_heads: int = spec(4, ge=1)
    num_kv_heads: int = spec(2, ge=1)
    seed: int = 0

    def check(self, key: str) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{key}.hidden_size={self.hidden_size} is not a multiple of {key}.num_heads={self.num_heads}.")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{key}.num_heads={self.num_heads} is not a multiple of {key}.num_kv_heads={self.num_kv_heads}.")


@dataclass
class ModelSchema:
    """``model`` (conf/model/*.yaml)."""

    name: str = "model"
    source: Optional[str] = None
    path: Optional[str] = None
    context_length: int = spec(4096, ge=2, hint="the model's trained context")
    dtype: str = spec("float32", choices=DTYPES)
    attn_implementation: str = "sdpa"
    pad_vocab_multiple: Optional[int] = spec(None, ge=1, hint="e.g. 64: 32,001 rows -> 32,064 (tensor-core sized output matmul)")
    tiny: Optional[TinySchema] = None

    def check(self, key: str) -> None:
        from .confdir import available_options

        if self.source not in MODEL_SOURCES:
            raise ConfigError(f"{key}.source={fmt(self.source)}: choose one of {choices_text(MODEL_SOURCES)} "
                              f"(or pick a model config: model={'|'.join(available_options('model'))}).")
        if self.source == "pretrained" and not self.path:
            raise ConfigError(f"{key}.path is empty: give a hub id or a local HF checkpoint directory.")
        impl = self.attn_implementation
        if impl not in ATTN_IMPLEMENTATIONS and "/" not in impl:
            raise ConfigError(f"{key}.attn_implementation={impl!r}: choose one of {choices_text(ATTN_IMPLEMENTATIONS)} "
                              f"(or a hub kernel 'org/name').{close(impl, ATTN_IMPLEMENTATIONS)}")


# ---- data (checked after compose, one schema per kind) --------------------------------------------


@dataclass
class RetrySchema:
    """``data.retry``: transient read errors of streamed/remote files (anllm.data.retry)."""

    attempts: int = spec(10, ge=1)
    backoff_s: float = spec(2.0, ge=0)
    max_backoff_s: float = spec(120.0, ge=0)


def _paths_ok(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(p, str) for p in value))


@dataclass
class DataSchema:
    """The keys every data kind takes (anllm.data.build, anllm.data.split)."""

    kind: str = spec("demo", choices=DATA_KINDS)
    id: Optional[str] = None
    name: Optional[str] = None
    base_dir: Optional[str] = None
    max_documents: Optional[int] = spec(None, ge=1)
    holdout_fraction: Optional[float] = spec(None, ge=0.0, lt=1.0, hint="documents held out for evaluation")
    holdout_seed: Optional[int] = None
    holdout_paths: Any = None  # a path/glob or a list of them
    splitter: Optional[str] = spec(None, choices=SPLITTERS)
    packing: Optional[bool] = None
    keep_remainder: Optional[bool] = None
    batch_size: Optional[int] = spec(None, ge=1)
    description: Optional[str] = None

    def check(self, key: str) -> None:
        if not _paths_ok(self.holdout_paths):
            raise ConfigError(f"{key}.holdout_paths={fmt(self.holdout_paths)}: use a path/glob or a list of them.")


@dataclass
class JsonlDataSchema(DataSchema):
    kind: str = spec("jsonl", choices=DATA_KINDS)
    paths: Any = None  # a path/glob or a list of them (required)
    text_column: str = "text"
    retry: Optional[RetrySchema] = None

    def check(self, key: str) -> None:
        super().check(key)
        if not self.paths or not _paths_ok(self.paths):
            raise ConfigError(f"{key}.paths={fmt(self.paths)}: give the JSONL files as a list of paths/globs, "
                              f"e.g. {key}.paths='[a.jsonl,dir/*.jsonl]'.")


@dataclass
class DemoDataSchema(DataSchema):
    pass


@dataclass
class HubDataSchema(DataSchema):
    kind: str = spec("hub", choices=DATA_KINDS)
    config: Optional[str] = None
    split: str = "train"
    streaming: bool = True
    text_column: str = "text"
    shuffle_buffer: Optional[int] = spec(None, ge=0)
    revision: Optional[str] = None
    data_files: Any = None  # globs inside the dataset repo, fsspec URLs, or a {split: [...]} mapping
    repeat: Optional[bool] = None
    shard_mb: Optional[float] = spec(None, gt=0)
    retry: Optional[RetrySchema] = None

    def check(self, key: str) -> None:
        super().check(key)
        if self.holdout_fraction or self.holdout_paths:
            raise ConfigError(f"{key}.holdout_fraction/{key}.holdout_paths: streamed hub data cannot hold out documents; "
                              "drop them (evaluate on a local jsonl slice instead).")


@dataclass
class SftDataSchema(DataSchema):
    kind: str = spec("sft", choices=DATA_KINDS)
    alpaca_path: Optional[str] = None
    parallel_path: Optional[str] = None
    max_examples: Optional[int] = spec(None, ge=1)
    sft_template: Optional[str] = spec(None, choices=SFT_TEMPLATES)

    def check(self, key: str) -> None:
        super().check(key)
        if not self.alpaca_path and not self.parallel_path:
            raise ConfigError(f"{key}.alpaca_path and {key}.parallel_path are both empty: give at least one.")


DATA_SCHEMAS: dict[str, type[DataSchema]] = {"jsonl": JsonlDataSchema, "demo": DemoDataSchema, "hub": HubDataSchema,
                                              "sft": SftDataSchema}


def data_keys(kind: str) -> tuple[str, ...]:
    """The keys a data config of ``kind`` takes."""
    return tuple(f.name for f in dataclasses.fields(DATA_SCHEMAS[kind]))


def check_data(data: Mapping[str, Any] | None, key: str = "data") -> DataSchema:
    """A data config (a training run's ``data``, or ``ppl.data``/``recall.data``/... of evaluate.py),
    by the schema of its ``kind``."""
    from .confdir import available_options

    data = data if isinstance(data, Mapping) else {}
    kind = data.get("kind")
    if kind not in DATA_SCHEMAS:
        hint = f" (or a data config: data={'|'.join(available_options('data'))})" if key == "data" else ""
        raise ConfigError(f"{key}.kind={fmt(kind)}: choose one of {choices_text(DATA_KINDS)}{hint}.{close(kind, DATA_KINDS)}")
    try:
        return check_section(DATA_SCHEMAS[kind], data, key)
    except ConfigError as e:
        if str(e).startswith("Unknown key") and f": {key} takes " in str(e):
            raise ConfigError(str(e).replace(f": {key} takes ", f": {key} (kind {kind}) takes ", 1)) from None
        raise


def check_model(model: Mapping[str, Any] | None, key: str = "model") -> ModelSchema:
    return check_section(ModelSchema, model or {}, key)
