"""The package's one user-error type, in a leaf module so every layer can raise it.

:class:`InputError` is what the command-line contract (:mod:`anllm.cli`) turns into one line and
exit code 2; :class:`anllm.schema.ConfigError` (a config value that cannot work) is one.
"""

from __future__ import annotations


class InputError(ValueError):
    """A problem with what the user asked for (not a bug): reported as one line, exit code 2."""


__all__ = ["InputError"]
