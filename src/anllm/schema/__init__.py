"""Typed configuration: dataclass schemas of train.py, evaluate.py and study.py, checked when the
config is composed (Hydra structured configs) and right after (the sections whose keys depend on the
chosen option), before any model or data is loaded.

Importing this package registers the root schemas in Hydra's ConfigStore (``base_train``,
``base_evaluate``, ``base_study``: the first entries of the defaults lists of conf/train.yaml,
conf/evaluate.yaml, conf/study.yaml). ``import anllm`` does it, so every way of composing the configs
(the CLIs, ``hydra.compose`` in tests and scripts) sees them.

Every problem is one :class:`ConfigError` line naming the key, the value and what is allowed; the
CLIs print it as ``<program>: config error: ...`` and exit with code 2 (:mod:`anllm.cli`).
:func:`compose` is Hydra's compose with its errors turned into such lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from hydra.core.config_store import ConfigStore

from .confdir import CONF_DIR, available_options
from .core import ConfigError, check_section, from_hydra, plain, plain_dict
from .evaluate import EvaluateSchema, check_evaluate
from .study import StudyRootSchema, StudySchema, check_study
from .train import DATA_SCHEMAS, ModelSchema, TrainSchema, check_data, check_model, data_keys
from .trainer import ANLLM_TRAINER_KEYS, check_deepspeed, check_trainer, training_argument_types

ROOTS: dict[str, type] = {"train": TrainSchema, "evaluate": EvaluateSchema, "study": StudyRootSchema}


def register() -> None:
    """Store the root schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for name, schema in ROOTS.items():
        cs.store(name=f"base_{name}", node=schema, provider="anllm")


register()


def _train_unknown_key(key: str, value: str | None) -> str | None:
    """A better line for an override of a key the composed train config lacks."""
    section, _, rest = key.partition(".")
    shown = f"={value}" if value is not None else "=..."
    if section == "trainer" and rest and "." not in rest:
        names = set(training_argument_types()) | set(ANLLM_TRAINER_KEYS)
        if rest in names:
            return f"trainer.{rest} is not set by this config: add it with a plus, +trainer.{rest}{shown}"
        from .core import close

        return (f"trainer.{rest} is not a transformers.TrainingArguments field.{close(rest, names)} "
                "See `python -c \"import transformers; help(transformers.TrainingArguments)\"`.")
    if section in ("model", "data") and rest and "." not in rest:
        from dataclasses import fields

        from .core import close

        known = [f.name for f in fields(ModelSchema)] if section == "model" else sorted(
            {k for kind in DATA_SCHEMAS for k in data_keys(kind)})
        if rest in known:
            return f"{key} is not set by this {section} config: add it with a plus, +{key}{shown}"
        return f"Unknown key {key}: a {section} config takes {', '.join(known)}.{close(rest, known)}"
    return None


def compose(config_name: str, overrides: Sequence[str] = (), conf_dir: Path | str = CONF_DIR,
            return_hydra_config: bool = False) -> Any:
    """Hydra's compose of ``<conf_dir>/<config_name>.yaml`` with ``overrides``, exactly as the CLIs compose
    (the one compose of the package: CLIs, study, prebuild, tests); a compose error (a wrong type, a key
    the config lacks, a bad override) becomes one :class:`ConfigError` line naming the key."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    import yaml

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides),
                                 return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException, ValueError, yaml.YAMLError) as e:
        hint: Callable[[str, str | None], str | None] | None = _train_unknown_key if config_name == "train" else None
        raise from_hydra(e, ROOTS.get(config_name), overrides, hint) from None


def cli_overrides(argv: Sequence[str]) -> list[list[str]] | None:
    """The job overrides of a command line, one list per run of a sweep (``a=1,2``); None when the
    command line asks Hydra for something else (``--help``, ``--cfg``, ``--config-name``, ...)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = []
    for a in argv:
        if a in ("-m", "--multirun"):
            continue
        if a.startswith("-"):
            return None
        if a.lstrip("+~").startswith(("hydra.", "hydra/")):
            continue
        args.append(a)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=args)
    except Exception as e:  # noqa: BLE001 - a malformed override: Hydra's own message, on one line
        raise from_hydra(e, None, args) from None
    if not any(o.is_sweep_override() for o in parsed):
        return [args]
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(run) for batch in batches for run in batch]


__all__ = [
    "CONF_DIR", "ConfigError", "EvaluateSchema", "ModelSchema", "StudyRootSchema", "StudySchema", "TrainSchema", "check_data",
    "check_deepspeed", "check_evaluate", "check_model", "check_section", "check_study", "check_trainer", "cli_overrides",
    "available_options", "compose", "plain", "plain_dict", "register",
]
