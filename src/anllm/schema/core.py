"""The machinery of the typed configs: declarative fields, one validation pass, one-line errors.

A schema is a dataclass whose fields carry their type (checked by OmegaConf) and, in ``metadata``,
what values are allowed (``choices``, ``ge``/``gt``/``le``/``lt``; ``each`` applies them to every
item of a list). :func:`check_section` merges a config into its schema (so OmegaConf rejects a wrong
type or an unknown key, naming the ``full_key``), builds the dataclass objects and walks them: the
allowed values of every field, then each dataclass's own ``check(key)`` for rules across fields.
Every failure is one :class:`ConfigError` line: the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from ..errors import InputError


class ConfigError(InputError):
    """A config value that cannot work; the message names the key and the fix (one line, exit 2)."""


# ---- declaring fields -----------------------------------------------------------------------------


def spec(default: Any = None, *, factory: Any = None, choices: Sequence[Any] | None = None, ge: float | None = None,
         gt: float | None = None, le: float | None = None, lt: float | None = None, each: bool = False,
         hint: str | None = None) -> Any:
    """A dataclass field with its allowed values (checked by :func:`check_section`).

    ``hint`` is added to the error message (what the value means, how to fix it)."""
    md = {k: v for k, v in dict(choices=tuple(choices) if choices is not None else None, ge=ge, gt=gt, le=le, lt=lt,
                                each=each or None, hint=hint).items() if v is not None}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def fmt(value: Any) -> str:
    """A value as the user would write it on the command line (``null``, ``true``, ``'abc'``, ``[1, 2]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value)


def choices_text(choices: Iterable[Any]) -> str:
    return ", ".join("null" if c is None else ("true" if c is True else "false" if c is False else str(c))
                     for c in choices)


def close(word: Any, choices: Iterable[Any]) -> str:
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" Did you mean {match[0]!r}?" if match else ""


def join(prefix: str, key: str) -> str:
    if not prefix:
        return key
    if not key:
        return prefix
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def plain(node: Any, key: str = "") -> Any:
    """``node`` as plain Python containers, interpolations resolved (a failure names the key); anything
    that is not a config node comes back unchanged. The one conversion of configs to plain data."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return node
    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as e:
        raise from_omegaconf(e, None, None, key) from None


def plain_dict(cfg: Any) -> dict[str, Any]:
    """A config section (a ``DictConfig`` or any mapping) as a new plain ``dict``, interpolations resolved."""
    return dict(plain(cfg))


# ---- types: what a field takes, in words ----------------------------------------------------------


def _args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def describe(tp: Any, plural: bool = False) -> str:
    """``int`` -> 'an integer', ``Optional[List[str]]`` -> 'a list of strings or null', ..."""
    if tp is Any or tp is None:
        return "anything"
    if _is_union(tp):
        parts = [a for a in _args(tp) if a is not type(None)]
        text = " or ".join(describe(a, plural) for a in parts)
        return f"{text} or null" if len(parts) < len(_args(tp)) else text
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence, typing.List):
        inner = _args(tp)[0] if _args(tp) else Any
        return ("lists" if plural else "a list") + ("" if inner is Any else f" of {describe(inner, True)}")
    if origin in (dict, Mapping, typing.Dict):
        inner = _args(tp)[1] if len(_args(tp)) == 2 else Any
        return ("mappings" if plural else "a mapping") + ("" if inner is Any else f" of names to {describe(inner, True)}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"one of {choices_text(m.value for m in tp)}"
    if dataclasses.is_dataclass(tp):
        keys = ", ".join(f.name for f in dataclasses.fields(tp))
        return f"sections ({keys})" if plural else f"a section with the keys {keys}"
    words = {bool: ("true or false", "booleans"), int: ("an integer", "integers"), float: ("a number", "numbers"),
             str: ("a string", "strings"), dict: ("a mapping", "mappings"), list: ("a list", "lists")}
    if tp in words:
        return words[tp][1 if plural else 0]
    return getattr(tp, "__name__", str(tp))


_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def split_key(key: str) -> list[str | int]:
    return [int(i) if i else name for name, i in _PART.findall(key or "")]


def lookup(data: Any, key: str) -> tuple[bool, Any]:
    """``(found, value)`` of a dotted key (``a.b[2].c``) in plain containers."""
    node = data
    for part in split_key(key):
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            node = node[part]
        elif isinstance(part, str) and isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


def _unwrap(tp: Any) -> Any:
    if _is_union(tp):
        rest = [a for a in _args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def field_at(schema: Any, key: str) -> tuple[Any, dataclasses.Field | None, Any]:
    """``(type, dataclasses.Field or None, parent type)`` of ``key`` inside ``schema``."""
    tp: Any = schema
    fld = None
    parent: Any = None
    for part in split_key(key):
        parent = tp
        inner = _unwrap(tp)
        if dataclasses.is_dataclass(inner) and isinstance(part, str):
            hints = typing.get_type_hints(inner)
            if part not in hints:
                return Any, None, parent
            fld = next(f for f in dataclasses.fields(inner) if f.name == part)
            tp = hints[part]
        elif typing.get_origin(inner) in (dict, typing.Dict) and len(_args(inner)) == 2:
            tp, fld = _args(inner)[1], None
        elif typing.get_origin(inner) in (list, typing.List) and _args(inner):
            tp, fld = _args(inner)[0], None
        else:
            return Any, None, parent
    return tp, fld, parent


def allowed_text(tp: Any, fld: dataclasses.Field | None) -> str:
    """What a field takes, in words: its type with its allowed values, null when optional, what it means."""
    md = fld.metadata if fld is not None else {}
    optional = _is_union(tp) and type(None) in _args(tp)
    text = describe(_unwrap(tp) if optional else tp)
    if md.get("choices"):
        text += f" ({choices_text(md['choices'])})"
    bounds = [f"{word} {md[name]}" for name, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if name in md]
    if bounds:
        text += " " + " and ".join(bounds)
    if optional and "or null" not in text:
        text += " or null"
    if md.get("hint"):
        text += f" ({md['hint']})"
    return text


def field_names(tp: Any) -> list[str]:
    inner = _unwrap(tp)
    return [f.name for f in dataclasses.fields(inner)] if dataclasses.is_dataclass(inner) else []


# ---- OmegaConf / Hydra errors as one line ---------------------------------------------------------


def first_line(text: str) -> str:
    return next((ln.strip() for ln in str(text).splitlines() if ln.strip()), str(text))


def from_omegaconf(e: OmegaConfBaseException, schema: Any, data: Any, prefix: str = "") -> ConfigError:
    """One line naming the key, the value and what is allowed, for an OmegaConf error of a merge into
    ``schema`` of the plain ``data`` (``prefix``: where ``data`` sits in the whole config)."""
    rel = str(getattr(e, "full_key", "") or "")
    key = join(prefix, rel)
    found, value = lookup(data, rel) if data is not None else (False, None)
    shown = f"={fmt(value)}" if found else ""
    msg = first_line(getattr(e, "msg", "") or str(e))
    if isinstance(e, MissingMandatoryValue):
        return ConfigError(f"{key} has no value (???): set it, e.g. {key}=...")
    if isinstance(e, InterpolationResolutionError):
        return ConfigError(f"{key or 'config'}: {msg}")
    if schema is None:
        return ConfigError(f"{key}{shown}: {msg}")
    tp, fld, parent = field_at(schema, rel)
    if isinstance(e, ConfigKeyError) or msg.startswith("Key '"):
        names = field_names(parent)
        where = key.rpartition(".")[0] if "." in key else ""
        last = split_key(rel)[-1] if rel else ""
        known = f"{where or 'the top level'} takes {', '.join(names)}." if names else ""
        return ConfigError(f"Unknown key {key}{shown}: {known}{close(last, names)}")
    if isinstance(e, ValidationError):
        allowed = allowed_text(tp, fld)
        if found and value is None:
            return ConfigError(f"{key}=null is not allowed: {key} takes {allowed}.")
        return ConfigError(f"{key}{shown} is not {allowed}." if tp is not Any else f"{key}{shown}: {msg}")
    return ConfigError(f"{key}{shown}: {msg}")


def _hydra_cause(e: BaseException) -> BaseException | None:
    seen = e
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_FULL_KEY = re.compile(r"full_key:\s*(\S+)")


def from_hydra(e: BaseException, schema: Any, overrides: Sequence[str] = (),
               unknown_hint: Any = None) -> ConfigError:
    """One line for an error of Hydra's compose (an override of the wrong type, a key not in the
    config, a bad group option, a shipped config file that does not fit its schema).

    ``unknown_hint(key, value) -> str | None`` may explain a key the composed config lacks (e.g.
    trainer.* names TrainingArguments' fields)."""
    given = {}
    for o in overrides:
        k, sep, v = o.lstrip("+~").partition("=")
        if sep:
            given[k] = v
    cause = _hydra_cause(e)
    text = str(e)
    if getattr(e, "override", None):  # hydra.errors.OverrideParseException
        return ConfigError(f"cannot parse the override {e.override!r}: {first_line(text)} (values with '=', ',', "
                           "'[' or spaces need quotes, e.g. key=\"['a=1']\"; "
                           "https://hydra.cc/docs/advanced/override_grammar/basic/).")
    if cause is not None:
        key = str(getattr(cause, "full_key", "") or "")
        if not key:
            m = _FULL_KEY.search(str(cause)) or _FULL_KEY.search(text)
            key = m.group(1) if m else ""
        value_text = given.get(key)
        if value_text is None:
            m = re.search(r"Value '(.*?)' of type", str(getattr(cause, "msg", "") or cause))
            value_text = m.group(1) if m else None
        shown = f"={value_text}" if value_text is not None else ""
        tp, fld, parent = field_at(schema, key) if schema is not None and key else (Any, None, None)
        where = text.split("'")[1] if text.startswith("In '") else None
        origin = f" (in conf/{where}.yaml)" if where else ""
        if isinstance(cause, ValidationError) and key:
            if tp is Any:
                return ConfigError(f"{key}{shown}{origin}: {first_line(cause.msg)}")
            return ConfigError(f"{key}{shown}{origin} is not {allowed_text(tp, fld)}.")
        if isinstance(cause, (ConfigKeyError, AttributeError, KeyError)) and key:
            hint = unknown_hint(key, value_text) if unknown_hint is not None else None
            if hint:
                return ConfigError(hint)
            names = field_names(parent) if parent is not None else []
            if names:
                last = split_key(key)[-1]
                section = key.rpartition(".")[0] or "the top level"
                return ConfigError(f"Unknown key {key}{shown}{origin}: {section} takes {', '.join(names)}."
                                   f"{close(last, names)}")
            return ConfigError(f"{key} is not in the composed config: add a new key with a plus, +{key}{shown or '=...'}")
        if key:
            return ConfigError(f"{key}{shown}{origin}: {first_line(getattr(cause, 'msg', '') or str(cause))}")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Set the environment")]
    return ConfigError(" ".join(lines) or type(e).__name__)


# ---- the validation pass --------------------------------------------------------------------------


def check_value(key: str, value: Any, md: Mapping[str, Any]) -> None:
    """The allowed values of one field (``choices``, ranges) — of each item when ``each``."""
    if not md:
        return
    listed = bool(md.get("each")) and isinstance(value, (list, tuple))
    values = value if listed else [value]
    hint = f" ({md['hint']})" if md.get("hint") else ""
    base = key
    for i, v in enumerate(values):
        key = f"{base}[{i}]" if listed else base
        if v is None:
            continue
        if "choices" in md and v not in md["choices"]:
            raise ConfigError(f"{key}={fmt(v)}: choose one of {choices_text(md['choices'])}{hint}.{close(v, md['choices'])}")
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        bounds = (("ge", ">=", v >= md.get("ge", v)), ("gt", ">", "gt" not in md or v > md["gt"]),
                  ("le", "<=", v <= md.get("le", v)), ("lt", "<", "lt" not in md or v < md["lt"]))
        if not all(ok for _, _, ok in bounds):
            parts = [f"{word} {md[name]}" for name, word, _ in bounds if name in md]
            raise ConfigError(f"{key}={fmt(v)} is out of range: it must be {' and '.join(parts)}{hint}.")


def walk(obj: Any, key: str) -> None:
    """Check every field's allowed values, then each dataclass's own ``check(key)``, depth first."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            check_value(join(key, f.name), value, f.metadata)
            walk(value, join(key, f.name))
        check = getattr(obj, "check", None)
        if callable(check):
            check(key)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            walk(v, join(key, str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            walk(v, f"{key}[{i}]")


def check_section(schema: type, node: Any, key: str = "") -> Any:
    """Validate ``node`` (a DictConfig or plain mapping) against the dataclass ``schema``; return the
    dataclass object. ``key`` is where ``node`` sits in the whole config (for the messages)."""
    data = plain(node, key)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key}={fmt(data)} is not {describe(schema)}.")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise from_omegaconf(e, schema, data, key) from None
    walk(obj, key)
    return obj


def fields_of(schema: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(schema))
