"""JSON replies from an LLM: find the JSON in the text, check it against a small schema or a callable.

    value = extract_json('Sure! ```json\n{"entities": ["a", "b"]}\n``` Hope that helps.')   # {"entities": [...]}
    check_schema(value, {"type": "object", "required": ["entities"],
                         "properties": {"entities": {"type": "array", "items": {"type": "string"}, "minItems": 1}}})
    parsed, error = check_reply(text, schema=..., validate=...)   # error: None, or what a repair request says
    response_format(schema)   # {"type": "json_schema", ...}: asks a server for schema-constrained JSON

The schema language (a subset of JSON Schema; unknown keywords are an error): docs/synth.md, "JSON replies";
structured output: "Structured output"."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

_DECODER = json.JSONDecoder()
_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool,
          "null": type(None)}
_KEYWORDS = {"type", "required", "properties", "additionalProperties", "items", "minItems", "maxItems", "minLength",
             "maxLength", "enum", "description", "title"}
# OpenAI's strict mode takes a narrower subset (every object closed and all its properties required, no string
# lengths): a schema outside it is sent with strict false, which OpenAI treats as guidance and vLLM enforces anyway.
_STRICT_KEYWORDS = {"type", "required", "properties", "additionalProperties", "items", "enum", "description", "title"}
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_START_CANDIDATES = 64  # positions of "{" / "[" tried before giving up on a reply


class JsonReplyError(ValueError):
    """A reply with no JSON value in it, or one that does not match the schema; the message says why."""


def extract_json(text: str) -> Any:
    """The first JSON object or array in `text` (inside ``` fences or surrounded by prose)."""
    first_error = None  # the parser's complaint about the first candidate: the most useful message for a repair
    for start in [i for i, ch in enumerate(text) if ch in "{["][:_MAX_START_CANDIDATES]:
        try:
            return _DECODER.raw_decode(text, start)[0]
        except ValueError as e:
            first_error = first_error or e
    if first_error is None:
        raise JsonReplyError("the reply contains no JSON object or array")
    raise JsonReplyError(f"the reply is not valid JSON: {first_error}")


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
    if isinstance(value, str) and "maxLength" in schema and len(value) > schema["maxLength"]:
        return f"{path}: expected at most {schema['maxLength']} characters, got {len(value)}"
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


def _strict_compatible(schema: dict) -> bool:
    if set(schema) - _STRICT_KEYWORDS:
        return False
    if "properties" in schema and (schema.get("additionalProperties") is not False
                                   or set(schema.get("required", ())) != set(schema["properties"])):
        return False
    subs = [*schema.get("properties", {}).values(), *([schema["items"]] if "items" in schema else [])]
    return all(_strict_compatible(sub) for sub in subs)


def response_format(schema: dict) -> dict:
    """The OpenAI `response_format` that asks for JSON matching `schema` (schema-constrained decoding on vLLM,
    structured outputs on OpenAI). The schema subset is plain JSON Schema, so it is sent as it is; named by its
    "title" when that is a valid name."""
    check_schema_keywords(schema)
    title = schema.get("title")
    name = title if isinstance(title, str) and _NAME.fullmatch(title) else "reply"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": _strict_compatible(schema)}}


def check_schema_keywords(schema: dict, path: str = "$") -> None:
    """ValueError unless every keyword of `schema` (and of its sub-schemas) is one of the subset's."""
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(f"schema at {path}: unsupported keywords {sorted(unknown)} (supported: {sorted(_KEYWORDS)})")
    for name, sub in schema.get("properties", {}).items():
        check_schema_keywords(sub, f"{path}.{name}")
    if "items" in schema:
        check_schema_keywords(schema["items"], f"{path}[]")


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
