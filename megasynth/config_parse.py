"""A tree of dataclasses read from TOML and dotted command-line overrides, and described from its field docstrings.

The mechanism behind megasynth.config (which holds the schema): every value is checked against its field's
annotation; unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import sys
import textwrap
import typing
import warnings
from typing import Any, Literal, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration problem; the message names the key (and the file, when there is one)."""


_WARNED: set[tuple[str, str]] = set()  # renamed values already warned about in this process


# ----------------------------------------------------------------------------------------------- docstrings


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass: {field name: the string literal right under it}."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cfg: Any) -> str:
    """Every key of a tree of dataclasses (two levels: sections, then fields) with its type, current value and
    docstring: the body of `--help`."""
    lines = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        lines.append(f"[{section.name}]")
        docs = field_docs(type(sub))
        hints = typing.get_type_hints(type(sub))
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            lines.append(f"  --{section.name}.{f.name}={_format_value(value)}  ({_type_name(hints[f.name])})")
            lines.append(textwrap.fill(docs.get(f.name, ""), 100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _format_value(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return "{" + ", ".join(f"{k}={_format_value(v)}" for k, v in dataclasses.asdict(value).items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, str):
        return repr(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


# ----------------------------------------------------------------------------------------------- coercion


# Scalar annotations: (accepts a TOML value, what the error says is expected). bool is an int in Python, so
# the numeric types refuse it explicitly.
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _coerce(value: Any, tp: Any, key: str, renamed: dict) -> Any:
    """Check `value` against the annotation `tp` (converting int -> float, tables -> dataclasses)."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        value = _renamed(key, value, renamed)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", renamed) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__} {value!r}")
        return build(tp, value, key, renamed)
    if tp not in _SCALARS:  # a schema bug (a union, a dict, ...), never the user's
        raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover
    accepts, expected = _SCALARS[tp]
    if not accepts(value):
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    return float(value) if tp is float else value


def _renamed(key: str, value: Any, renamed: dict) -> Any:
    new = renamed.get(key, {}).get(value) if isinstance(value, str) else None
    if new is None:
        return value
    if (key, value) not in _WARNED:
        _WARNED.add((key, value))
        warnings.warn(f"{key}={value!r} is deprecated and read as {new!r}, its new name: write {key}={new!r}",
                      FutureWarning, stacklevel=2)
    return new


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}'{hint}; known keys here: {', '.join(known)}")


def build(cls: type, table: dict, prefix: str, renamed: dict) -> Any:
    """The dataclass `cls` from a TOML table, every value type-checked; ConfigError names the first bad key.
    renamed: {dotted key: {old value: new value}} for values read under an old name (one warning each)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in table:
        if key not in names:
            raise _unknown_key(f"{prefix}.{key}" if prefix else key, names)
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k, renamed) for k, v in table.items()}
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------- overrides


def _parse_value(text: str) -> Any:
    """A command-line value as TOML (numbers, booleans, lists, quoted strings), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """["--a.b=1", "--c.d", "x"] -> {"a.b": 1, "c.d": "x"}; anything else is an error naming the argument."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, raw = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value: write --{body}=VALUE")
        out[key] = _parse_value(raw)
        i += 1
    return out


def _set_override(root: type, table: dict, key: str, value: Any) -> None:
    """table[section][name] = value for key "section.name", which must exist in `root`."""
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"override '{key}': expected section.key (e.g. train.steps)")
    section, name = parts
    sections = [f.name for f in dataclasses.fields(root)]
    if section not in sections:
        raise _unknown_key(section, sections)
    names = [f.name for f in dataclasses.fields(typing.get_type_hints(root)[section])]
    if name not in names:
        raise _unknown_key(key, names)
    node = table.setdefault(section, {})
    if not isinstance(node, dict):
        raise ConfigError(f"override '{key}': '{section}' is not a section")
    node[name] = value


def read_table(root: type, path: str | os.PathLike | None, overrides: list[str]) -> dict:
    """The TOML file (if any) with the dotted overrides applied; each override's key must exist in `root`."""
    table: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
    for key, value in parse_overrides(overrides).items():
        _set_override(root, table, key, value)
    return table
