"""The schema of ``evaluate.py``'s config (conf/evaluate.yaml, conf/eval/<suite>/default.yaml, conf/protocol).

Registered in Hydra's ConfigStore as ``base_evaluate`` (the first entry of conf/evaluate.yaml's
defaults list): the top-level keys and one section per suite, with exactly the keys of the YAML files
(the suites fingerprint their section to decide what a re-run may reuse, so the schema adds no key).
``null`` in a suite's section means "the suite's default". The suites' own ``check`` functions stay
the semantic checks (methods, files, data directories); this schema adds types, unknown keys and the
allowed values of the options that have a fixed set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from .core import ConfigError, fmt, spec
from .train import ProtocolSchema, check_data

DEVICE_HINT = "auto, cpu, cuda, cuda:N or mps"


@dataclass
class QASchema:
    source: str = spec("auto", choices=("auto", "local", "hub"))
    baselines: Optional[List[str]] = field(default_factory=lambda: ["streamingllm"])
    num_sink_tokens: int = spec(4, ge=0)
    insert_anchors: bool = True
    stock: bool = True
    prefill_chunk_size: Optional[int] = spec(None, ge=1)
    ac_layout: str = spec("sentence", choices=("sentence", "demonstration"))


@dataclass
class TranslationSchema:
    methods: Any = None  # null, a method or a list of methods (the suite checks the names)
    max_new_tokens: Optional[int] = spec(512, ge=1)
    batch_size: Optional[int] = spec(None, ge=1)
    comet_model: Optional[str] = "Unbabel/wmt22-comet-da"
    comet_batch_size: int = spec(8, ge=1)
    comet_python: Optional[str] = None  # COMET's environment (null: $ANLLM_COMET_PYTHON, <repo>/.venv-comet)
    comet_cache_dir: Optional[str] = None
    hypotheses: Any = None  # a path, a list of paths, or "a,b"
    generate: Optional[bool] = None
    instruction: str = "Translate the following sentences from German to English."
    prompt_format: str = spec("alpaca", choices=("alpaca", "chat"))
    splitter: Optional[str] = spec(None, choices=("blingfire", "pysbd", "punkt"))
    plots: bool = True
    prefill_chunk_size: Optional[int] = spec(None, ge=1)
    src_cache: str = spec("prompt", choices=("prompt", "source"))
    decoding: str = spec("greedy", choices=("greedy", "paper"))
    seed: int = 0
    template: str = spec("anllm", choices=("anllm", "paper"))


def _check_data_option(data: Any, key: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{key}={fmt(data)}: give a training data config, e.g. {{kind: jsonl, paths: [...], "
                          "holdout_fraction: 0.02}} (the data section of a run's anllm_train_config.yaml).")
    check_data(data, key)


@dataclass
class PPLSchema:
    methods: Any = None  # null (the run's modes), a method or a list (the suite checks the names)
    num_documents: Optional[int] = spec(8, ge=1)
    select: str = spec("last", choices=("first", "last", "spread"))
    where: Any = None
    min_chars: Optional[int] = spec(2000, ge=0)
    max_tokens: Optional[int] = spec(2048, ge=1)
    chunk_size: Optional[int] = spec(256, ge=1)
    budget: Optional[int] = spec(None, ge=1)
    num_sink_tokens: Optional[int] = spec(4, ge=0)
    tail_from: Optional[int] = spec(None, ge=1)
    offset_bins: Optional[List[int]] = spec(None, ge=1, each=True)
    data: Any = None
    data_base_dir: Optional[str] = None

    def check(self, key: str) -> None:
        _check_data_option(self.data, f"{key}.data")


@dataclass
class RecallSchema:
    data: Any = None
    data_base_dir: Optional[str] = None
    num_items: Optional[int] = spec(100, ge=1)
    distances: Optional[List[int]] = spec(factory=lambda: [0, 2, 5, 10, 20], ge=0, each=True)
    num_choices: Optional[int] = spec(4, ge=2)
    num_before: Optional[int] = spec(3, ge=0)
    seed: Optional[int] = 0
    methods: Optional[List[str]] = None
    num_sink_tokens: Optional[int] = spec(4, ge=0)
    batch_size: Optional[int] = spec(8, ge=1)

    def check(self, key: str) -> None:
        _check_data_option(self.data, f"{key}.data")


@dataclass
class LongrangeSchema:
    data: Any = None
    data_base_dir: Optional[str] = None
    num_items: Optional[int] = spec(20, ge=1)
    lengths: Any = None  # a list of token counts >= 64 (the suite checks them)
    depths: Any = None  # a list of numbers in [0, 1] (the suite checks them)
    num_keys: Optional[int] = spec(4, ge=1)
    hops: Optional[int] = spec(2, ge=1)
    seed: Optional[int] = 0
    methods: Optional[List[str]] = None
    num_sink_tokens: Optional[int] = spec(4, ge=0)
    batch_size: Optional[int] = spec(4, ge=1)

    def check(self, key: str) -> None:
        _check_data_option(self.data, f"{key}.data")


@dataclass
class EvaluateSchema:
    """The root of conf/evaluate.yaml (``base_evaluate`` in Hydra's ConfigStore)."""

    checkpoint: Optional[str] = None
    anchors: Optional[str] = spec(None, choices=("ep", "ac", "none"),
                                  hint="null = the checkpoint's own anchor settings")
    suite: Any = "qa"  # a suite, a list of suites, or all (anllm.eval.suites checks the names)
    tasks: Any = None  # null, a task or a list of tasks
    num_fewshot: Any = 0  # an integer or a list of integers
    limit: Optional[int] = spec(None, ge=1)
    batch_size: int = spec(8, ge=1)  # qa contexts / translation sentences per forward
    modes: List[str] = field(default_factory=lambda: ["full", "ansan", "anchor"])
    data_dir: Optional[str] = None
    output_dir: Optional[str] = None
    resume: bool = True
    device: str = "auto"
    dtype: str = spec("auto", choices=("auto", "float32", "bfloat16", "float16"))
    seed: int = 0
    position_mode: str = spec("true", choices=("true", "compact"),
                              hint="on the command line quote true as a string: \"position_mode='true'\"")
    num_threads: Optional[int] = spec(None, ge=1)
    progress: bool = True
    qa: QASchema = field(default_factory=QASchema)
    translation: TranslationSchema = field(default_factory=TranslationSchema)
    ppl: PPLSchema = field(default_factory=PPLSchema)
    recall: RecallSchema = field(default_factory=RecallSchema)
    longrange: LongrangeSchema = field(default_factory=LongrangeSchema)
    protocol: ProtocolSchema = field(default_factory=ProtocolSchema)

    def check(self, key: str) -> None:
        import re

        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"device={fmt(self.device)}: choose {DEVICE_HINT}.")
        shots = self.num_fewshot if isinstance(self.num_fewshot, list) else [self.num_fewshot]
        if not shots or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in shots):
            raise ConfigError(f"num_fewshot={fmt(self.num_fewshot)}: give an integer >= 0 or a list of them, e.g. [0,5].")
        from ..eval.suites import SUITES

        suites = self.suite if isinstance(self.suite, list) else [self.suite]
        for s in suites:
            if s not in SUITES and not (s == "all" and len(suites) == 1):
                raise ConfigError(f"Unknown suite {s!r}: choose one of {sorted(SUITES)} or 'all'.")
        if self.tasks is not None and not isinstance(self.tasks, (str, list)):
            raise ConfigError(f"tasks={fmt(self.tasks)}: give null (the suite's default tasks), a task or a list of tasks.")


def check_evaluate(cfg: Any) -> EvaluateSchema:
    """The whole evaluate.py config (a composed DictConfig or a mapping)."""
    from .core import check_section

    return check_section(EvaluateSchema, cfg)
