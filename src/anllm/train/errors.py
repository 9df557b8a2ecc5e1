"""The training side's error type (a leaf module, so every part of the package can raise it)."""

from __future__ import annotations

from ..cli import InputError


class ConfigError(InputError):
    """A config value that cannot work; the message names the key and the fix."""
