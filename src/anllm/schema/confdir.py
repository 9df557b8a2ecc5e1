"""Where the Hydra configs are, and which options a config group offers.

The YAML files ship inside the package (``anllm/conf``), so a non-editable install composes the
same configs as a checkout; the repository's top-level ``conf`` is a link to them. This module is
the one place that knows the directory (:func:`anllm.schema.compose`, the CLIs' checks and the
config-group hints in error messages all read it).
"""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def available_options(group: str) -> list[str]:
    """Options of a config group (``exp``, ``model``, ...), from Hydra when it runs, else from the files."""
    try:
        from hydra.core.global_hydra import GlobalHydra

        gh = GlobalHydra.instance()
        if gh.is_initialized():
            return sorted(gh.config_loader().get_group_options(group))
    except Exception:  # pragma: no cover - Hydra internals differ; fall back to the files
        pass
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


__all__ = ["CONF_DIR", "available_options"]
