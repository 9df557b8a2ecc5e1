"""Real checkpoints made available offline (no Hugging Face hub at run time)."""

from __future__ import annotations

from typing import Any

__all__ = ["default_cache_dir", "smollm2_path"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m anllm.models.smollm2` does not import the module twice.
    if name in __all__:
        from . import smollm2

        return getattr(smollm2, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
