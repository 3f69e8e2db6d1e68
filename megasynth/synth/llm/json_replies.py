"""JSON replies from an LLM: find the JSON in the text, check it against a small schema or a callable.

    value = extract_json('Sure! ```json\n{"entities": ["a", "b"]}\n``` Hope that helps.')   # {"entities": [...]}
    check_schema(value, {"type": "object", "required": ["entities"],
                         "properties": {"entities": {"type": "array", "items": {"type": "string"}, "minItems": 1}}})
    parsed, error = check_reply(text, schema=..., validate=...)   # error: None, or what a repair request says

The schema language (a subset of JSON Schema; unknown keywords are an error): docs/synth.md, "JSON replies"."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

_DECODER = json.JSONDecoder()
_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool,
          "null": type(None)}
_KEYWORDS = {"type", "required", "properties", "additionalProperties", "items", "minItems", "maxItems", "minLength",
             "enum", "description", "title"}
_MAX_START_CANDIDATES = 64  # positions of "{" / "[" tried before giving up on a reply


class JsonReplyError(ValueError):
    """A reply with no JSON value in it, or one that does not match the schema; the message says why."""


def extract_json(text: str) -> Any:
    """The first JSON object or array in `text` (inside ``` fences or surrounded by prose)."""
    candidates = [i for i, ch in enumerate(text) if ch in "{["][:_MAX_START_CANDIDATES]
    for start in candidates:
        try:
            value, _ = _DECODER.raw_decode(text, start)
        except ValueError:
            continue
        return value
    if not candidates:
        raise JsonReplyError("the reply contains no JSON object or array")
    try:  # report the parser's complaint about the first candidate: the most useful message for a repair
        _DECODER.raw_decode(text, candidates[0])
    except ValueError as e:
        raise JsonReplyError(f"the reply is not valid JSON: {e}") from None
    raise AssertionError("unreachable")


def _type_name(value: Any) -> str:
    for name, kind in _TYPES.items():
        if name != "number" and type(value) is kind:
            return name
    return "number" if isinstance(value, float) else type(value).__name__


def _is_type(value: Any, name: str) -> bool:
    if name not in _TYPES:
        raise ValueError(f"schema: unknown type {name!r} (known: {', '.join(_TYPES)})")
    if isinstance(value, bool):  # bool is an int in Python, never in JSON
        return name == "boolean"
    return isinstance(value, _TYPES[name])


def check_schema(value: Any, schema: dict, path: str = "$") -> str | None:
    """None when `value` matches `schema`, else a message naming the first mismatch by its path ($.a[2])."""
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(f"schema at {path}: unsupported keywords {sorted(unknown)} (supported: {sorted(_KEYWORDS)})")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, n) for n in names):
            return f"{path}: expected {' or '.join(names)}, got {_type_name(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path}: {value!r} is not one of {schema['enum']!r}"
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        return f"{path}: expected at least {schema['minLength']} characters, got {len(value)}"
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                return f"{path}: missing required key {name!r}"
        properties = schema.get("properties", {})
        if schema.get("additionalProperties", True) is False:
            extra = sorted(set(value) - set(properties))
            if extra:
                return f"{path}: unexpected keys {extra}"
        for name, sub in properties.items():
            if name in value:
                error = check_schema(value[name], sub, f"{path}.{name}")
                if error:
                    return error
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            return f"{path}: expected at least {schema['minItems']} items, got {len(value)}"
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return f"{path}: expected at most {schema['maxItems']} items, got {len(value)}"
        if "items" in schema:
            for i, item in enumerate(value):
                error = check_schema(item, schema["items"], f"{path}[{i}]")
                if error:
                    return error
    return None


Validator = Callable[[Any], "str | None"]


def check_reply(text: str, *, schema: dict | None = None, validate: Validator | None = None) -> tuple[Any, str | None]:
    """(parsed JSON value, None) when the reply is acceptable, else (value or None, why not).

    `validate(value)` returns None (or True) when the value is fine, a message (or False) when it is not, or
    raises ValueError with the message; it runs after the schema check."""
    try:
        value = extract_json(text)
    except JsonReplyError as e:
        return None, str(e)
    if schema is not None:
        error = check_schema(value, schema)
        if error:
            return value, f"the JSON does not match the schema: {error}"
    if validate is not None:
        try:
            verdict = validate(value)
        except ValueError as e:
            return value, f"the JSON was rejected: {e}"
        if verdict is False:
            return value, "the JSON was rejected by the validator"
        if isinstance(verdict, str):
            return value, f"the JSON was rejected: {verdict}"
    return value, None
