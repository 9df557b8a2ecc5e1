"""The training side's error type (a leaf module, so every part of the package can raise it)."""

from __future__ import annotations

from ..schema.core import ConfigError  # one class for every config problem (anllm.schema raises it too)

__all__ = ["ConfigError"]
