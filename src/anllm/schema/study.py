"""The schema of ``study.py``'s config (conf/study.yaml and conf/study/*.yaml).

The root (``base_study`` in Hydra's ConfigStore, the first entry of conf/study.yaml's defaults list)
is typed at compose time; the ``study`` option is checked against :class:`StudySchema` right after
compose (its options add sections — ``sweeps``, ``final``, ``longrange`` — that the others lack, and
the runner reads what is absent as "not in this study"). Cross-references are checked too: every arm
has a spec, every spec names an exp, the sweeps an arm uses exist, QA arms have modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .core import ConfigError, check_section, choices_text, close, fmt, spec
from .train import check_data

STAGES = ("sweep", "sweeps", "arms", "final", "recall", "longrange", "qa")  # anllm.study.runner.STAGES
SELECT = ("first", "last", "spread")
LONGRANGE_TASKS = ("passkey", "multikey", "vartrack")


def _methods(methods: Any, key: str, suite: str = "ppl") -> None:
    from ..eval.methods import ppl_method

    for i, m in enumerate(methods or []):
        try:
            ppl_method(m, suite)
        except ValueError as e:
            raise ConfigError(f"{key}[{i}]={fmt(m)}: {e}") from None


@dataclass
class StudyRootSchema:
    """The root of conf/study.yaml (``base_study``)."""

    work_dir: str = "outputs/study"
    report_dir: Optional[str] = None
    data_dir: str = "../shared/data"
    num_threads: Optional[int] = spec(None, ge=1)
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    study: Dict[str, Any] = field(default_factory=dict)

    def check(self, key: str) -> None:
        unknown = [st for st in self.stages if st not in STAGES]
        if unknown:
            raise ConfigError(f"Unknown study stage(s) {unknown} in stages={fmt(self.stages)}: choose from {STAGES}."
                              f"{close(unknown[0], STAGES)}")


@dataclass
class SweepSchema:
    """``study.sweep``: the optimiser sweep (AC runs, one per candidate set of trainer overrides)."""

    tokens: int = spec(49152, ge=1)
    run: List[str] = field(default_factory=list)
    candidates: Dict[str, List[str]] = field(default_factory=dict)
    warmup_ratio: float = spec(0.0, ge=0.0, le=1.0)

    def check(self, key: str) -> None:
        for name in self.run:
            if name not in self.candidates:
                raise ConfigError(f"{key}.run: {name!r} is not in {key}.candidates ({choices_text(self.candidates)})."
                                  f"{close(name, self.candidates)}")


@dataclass
class OptionSweepSchema:
    """``study.sweeps.<name>``: candidate option sets on one arm, and controls (e.g. λ = 0) run and
    reported the same way but never chosen, so a sweep says how much its option helps, not only which
    value is best."""

    arm: str = "ac_sink"
    tokens: int = spec(49152, ge=1)
    candidates: Dict[str, List[str]] = field(default_factory=dict)
    controls: Dict[str, List[str]] = field(default_factory=dict)

    def check(self, key: str) -> None:
        if not self.candidates:
            raise ConfigError(f"{key}.candidates is empty: give at least one option set.")
        both = sorted(set(self.candidates) & set(self.controls))
        if both:
            raise ConfigError(f"{key}: {both} named both a candidate and a control; give each option set one name.")


@dataclass
class ArmSpecSchema:
    exp: str = "baseline"
    overrides: List[str] = field(default_factory=list)
    uses: Optional[List[str]] = None


@dataclass
class StudyPPLSchema:
    num_documents: int = spec(8, ge=1)
    max_tokens: int = spec(1024, ge=1)
    min_chars: int = spec(6000, ge=0)
    select: str = spec("spread", choices=SELECT)
    chunk_size: int = spec(256, ge=1)
    methods: List[str] = field(default_factory=lambda: ["full", "anchor"])

    def check(self, key: str) -> None:
        _methods(self.methods, f"{key}.methods")


@dataclass
class FinalSetSchema(StudyPPLSchema):
    tail_from: Optional[int] = spec(None, ge=1)
    offset_bins: Optional[List[int]] = spec(None, ge=1, each=True)


@dataclass
class StudyRecallSchema:
    num_items: int = spec(100, ge=1)
    distances: List[int] = spec(factory=lambda: [0, 2, 5, 10, 20], ge=0, each=True)
    methods: List[str] = field(default_factory=lambda: ["full", "anchor", "streamingllm"])
    arms: Optional[List[str]] = None
    batch_size: int = spec(8, ge=1)
    num_choices: Optional[int] = spec(None, ge=2)

    def check(self, key: str) -> None:
        _methods(self.methods, f"{key}.methods", "recall")


@dataclass
class StudyLongrangeSchema:
    tasks: List[str] = spec(factory=lambda: list(LONGRANGE_TASKS), choices=LONGRANGE_TASKS, each=True)
    lengths: List[int] = spec(factory=lambda: [1024, 2048, 4096], ge=64, each=True)
    depths: List[float] = spec(factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9], ge=0.0, le=1.0, each=True)
    num_items: int = spec(20, ge=1)
    methods: List[str] = field(default_factory=lambda: ["full", "anchor", "streamingllm", "streamingllm_q"])
    arms: Optional[List[str]] = None
    batch_size: Optional[int] = spec(None, ge=1)

    def check(self, key: str) -> None:
        _methods(self.methods, f"{key}.methods", "longrange")


@dataclass
class QAArmSchema:
    modes: List[str] = field(default_factory=lambda: ["full"])
    baselines: List[str] = field(default_factory=list)


@dataclass
class StudyQASchema:
    tasks: List[str] = field(default_factory=lambda: ["arc_easy"])
    limit: Optional[int] = spec(None, ge=1)
    num_fewshot: int = spec(0, ge=0)
    arms: List[str] = field(default_factory=list)
    modes: Dict[str, QAArmSchema] = field(default_factory=dict)

    def check(self, key: str) -> None:
        for arm in self.arms:
            if arm not in self.modes:
                raise ConfigError(f"{key}.arms: {arm!r} has no entry in {key}.modes ({choices_text(self.modes)}): add "
                                  f"+{key}.modes.{arm}={{modes:[full],baselines:[]}}.")


@dataclass
class StudySchema:
    """``study`` (conf/study/*.yaml)."""

    name: str = "study"
    report_dir: str = "experiments/study"
    title: Optional[str] = None
    model: str = "smollm2_135m"
    block_size: int = spec(1024, ge=2)
    train_overrides: List[str] = field(default_factory=list)
    data: Dict[str, Any] = field(default_factory=dict)
    hp: Optional[List[str]] = None
    sweep: SweepSchema = field(default_factory=SweepSchema)
    sweeps: Dict[str, OptionSweepSchema] = field(default_factory=dict)
    tokens: int = spec(147456, ge=1)
    checkpoints: int = spec(4, ge=1)
    arms: List[str] = field(default_factory=list)
    arm_specs: Dict[str, ArmSpecSchema] = field(default_factory=dict)
    ppl: StudyPPLSchema = field(default_factory=StudyPPLSchema)
    final: Dict[str, FinalSetSchema] = field(default_factory=dict)
    recall: StudyRecallSchema = field(default_factory=StudyRecallSchema)
    longrange: Optional[StudyLongrangeSchema] = None
    qa: StudyQASchema = field(default_factory=StudyQASchema)

    def check(self, key: str) -> None:
        from .confdir import available_options

        models, exps = available_options("model"), available_options("exp")
        if self.model not in models:
            raise ConfigError(f"{key}.model={self.model!r}: choose one of {', '.join(models)}.{close(self.model, models)}")
        check_data(self.data, f"{key}.data")
        for arm in self.arms:
            if arm not in self.arm_specs:
                raise ConfigError(f"{key}.arms: {arm!r} has no entry in {key}.arm_specs ({choices_text(self.arm_specs)})."
                                  f"{close(arm, self.arm_specs)}")
        for name, arm in self.arm_specs.items():
            if arm.exp not in exps:
                raise ConfigError(f"{key}.arm_specs.{name}.exp={arm.exp!r}: choose one of {', '.join(exps)}."
                                  f"{close(arm.exp, exps)}")
            for use in arm.uses or []:
                if use not in self.sweeps:
                    raise ConfigError(f"{key}.arm_specs.{name}.uses: {use!r} is not in {key}.sweeps "
                                      f"({choices_text(self.sweeps) or 'none'}).{close(use, self.sweeps)}")
        for name, sw in self.sweeps.items():
            if sw.arm not in self.arm_specs:
                raise ConfigError(f"{key}.sweeps.{name}.arm={sw.arm!r} has no entry in {key}.arm_specs "
                                  f"({choices_text(self.arm_specs)}).{close(sw.arm, self.arm_specs)}")
        if self.hp is None and not self.sweep.run and self.arms:
            raise ConfigError(f"{key}.hp is null and {key}.sweep.run is empty: the arms need optimiser settings; set "
                              f"{key}.hp=[trainer.learning_rate=...] or name candidates in {key}.sweep.run.")
        for section, arms in (("recall", self.recall.arms), ("longrange", (self.longrange.arms if self.longrange else None))):
            for arm in arms or []:
                if arm not in self.arms and arm != "best":
                    raise ConfigError(f"{key}.{section}.arms: {arm!r} is not one of {key}.arms ({choices_text(self.arms)}) "
                                      "or 'best' (the anchor arm with the lowest margin over a window).")


def check_study(cfg: Any) -> tuple[StudyRootSchema, StudySchema]:
    """The composed study.py config: the root, then the ``study`` option."""
    root = check_section(StudyRootSchema, cfg)
    return root, check_section(StudySchema, root.study, "study")
