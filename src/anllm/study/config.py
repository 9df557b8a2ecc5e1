"""The study's config: composed like the CLIs' and checked before anything runs.

``python study.py`` composes ``conf/study.yaml`` (:func:`anllm.schema.compose`, the package's one
compose), checks its types and cross-references, and composes and validates the training config of
every arm and sweep candidate it names, so a typo in an override fails at once, not hours into the study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from ..schema import ConfigError, check_study, compose

# The study runs from a checkout: relative paths (work_dir, report_dir, data) start at its root.
REPO = Path(__file__).resolve().parents[3]
STAGES = ("sweep", "sweeps", "arms", "final", "recall", "longrange", "qa")


def validate(cfg: DictConfig, runs: bool = False) -> None:
    """The study config's types, keys and cross-references (:mod:`anllm.schema.study`); with ``runs``
    also the training config of every arm and sweep candidate it names (composed and validated as
    train.py would, data files aside), so a typo in an override fails now, not hours into the study."""
    _, settings = check_study(cfg)
    if not runs:
        return
    from ..train.config import validate as validate_train

    # the optimiser settings the arms train with: study.hp, or (before the sweep has run) its first candidate
    sweep = settings.sweep
    optimiser = list(settings.hp) if settings.hp is not None else list(sweep.candidates[sweep.run[0]]) if sweep.run else []
    base = [f"model={settings.model}", "data=jsonl", f"block_size={settings.block_size}", "trainer.max_steps=1",
            "trainer.report_to=[]", f"output_dir={cfg.work_dir}/check", *settings.train_overrides]
    checks: list[tuple[str, list[str]]] = []
    if settings.hp is None:
        checks += [(f"study.sweep.candidates.{n}", ["+exp=anllm_ac", *base, *sweep.candidates[n]]) for n in sweep.run]
    for name, sw in settings.sweeps.items():
        arm = settings.arm_specs[sw.arm]
        checks += [(f"study.sweeps.{name}.candidates.{cand}", [f"+exp={arm.exp}", *base, *optimiser, *arm.overrides, *extra])
                   for cand, extra in sw.candidates.items()]
    for name in settings.arms:
        arm = settings.arm_specs[name]
        uses = [o for u in arm.uses or [] for o in next(iter(settings.sweeps[u].candidates.values()))]
        checks.append((f"study.arm_specs.{name}", [f"+exp={arm.exp}", *base, *optimiser, *arm.overrides, *uses]))
    data = {**settings.data, "base_dir": str(REPO)}  # as Study.data: relative paths start at the repository root
    for what, overrides in checks:
        try:
            train_cfg = compose("train", overrides)
            with open_dict(train_cfg):
                train_cfg.data = OmegaConf.merge(train_cfg.data, data)
            validate_train(train_cfg, check_files=False)
        except ValueError as e:
            raise ConfigError(f"{what} (its training config): {e}") from None


def check(argv: Sequence[str]) -> DictConfig:
    """``study.py``'s command line composed and validated, with the training config of every arm
    (raises :class:`anllm.cli.InputError`; nothing is written)."""
    cfg = compose("study", argv)
    validate(cfg, runs=True)
    return cfg
