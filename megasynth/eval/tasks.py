"""Evaluation task files: JSONL, one example per line, one task type per file (schemas in docs/eval.md).

    task = load_task("examples/eval/capitals.jsonl")            # type from each line's "type" field
    task = load_task("qa.jsonl", task_type="generative")        # or given for the whole file
    task.examples, task.fewshot                                 # "split": "test" (default) / "fewshot"

The types are multiple_choice, generative and quality (TASK_TYPES); any problem is a TaskError
"FILE:LINE: field "name": what was expected".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from megasynth.io import JsonlError, read_jsonl

TASK_TYPES = ("multiple_choice", "generative", "quality")
SPLITS = ("test", "fewshot")


class TaskError(ValueError):
    """A malformed task file; the message starts with FILE:LINE."""


@dataclass
class MultipleChoiceExample:
    id: str
    line: int
    context: str
    choices: list[str]
    gold: int


@dataclass
class GenerativeExample:
    id: str
    line: int
    prompt: str
    answers: list[str]


@dataclass
class QualityExample:
    id: str
    line: int
    article_id: str
    title: str
    question: str
    options: list[str]
    gold: int


Example = MultipleChoiceExample | GenerativeExample | QualityExample


@dataclass
class Task:
    name: str  # the file name without .jsonl; names results and prediction files
    type: str
    path: str
    examples: list[Example] = field(default_factory=list)  # evaluated ("split": "test")
    fewshot: list[Example] = field(default_factory=list)  # the pool few-shot examples are drawn from


class _Line:
    """One parsed JSON line, with typed field getters whose errors name FILE:LINE and the field."""

    def __init__(self, path: str, lineno: int, obj: dict):
        self.where, self.obj = f"{path}:{lineno}", obj

    def error(self, name: str, expected: str) -> TaskError:
        got = self.obj.get(name, None)
        shown = "missing" if name not in self.obj else f"got {json.dumps(got)[:80]}"
        return TaskError(f"{self.where}: field \"{name}\": expected {expected}, {shown}")

    def string(self, name: str, *, required: bool = True, nonempty: bool = True, default: str = "") -> str:
        if name not in self.obj and not required:
            return default
        value = self.obj.get(name)
        if not isinstance(value, str) or (nonempty and not value.strip()):
            raise self.error(name, "a non-empty string" if nonempty else "a string")
        return value

    def strings(self, name: str, min_len: int) -> list[str]:
        value = self.obj.get(name)
        if (not isinstance(value, list) or len(value) < min_len
                or not all(isinstance(v, str) and v.strip() for v in value)):
            raise self.error(name, f"a list of at least {min_len} non-empty strings")
        return value

    def index(self, name: str, size: int) -> int:
        value = self.obj.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
            raise self.error(name, f"an integer index into the {size} choices (0-based, 0..{size - 1})")
        return value


def _parse_example(line: _Line, task_type: str, lineno: int) -> Example:
    raw_id = line.obj.get("id", lineno)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise line.error("id", "a string or an integer")
    ex_id = str(raw_id)
    if task_type == "multiple_choice":
        choices = line.strings("choices", 2)
        return MultipleChoiceExample(ex_id, lineno, line.string("context", nonempty=False), choices,
                                     line.index("gold", len(choices)))
    if task_type == "generative":
        return GenerativeExample(ex_id, lineno, line.string("prompt"), line.strings("answers", 1))
    options = line.strings("options", 2)
    raw_article = line.obj.get("article_id")
    if isinstance(raw_article, bool) or not isinstance(raw_article, (str, int)) or str(raw_article) == "":
        raise line.error("article_id", "a string or an integer")
    return QualityExample(ex_id, lineno, str(raw_article), line.string("title", required=False),
                          line.string("question"), options, line.index("gold", len(options)))


def load_task(path: str | os.PathLike, task_type: str | None = None) -> Task:
    """Parse and validate a task file; `task_type` applies to lines without a "type" field."""
    path = Path(path)
    if task_type is not None and task_type not in TASK_TYPES:
        raise TaskError(f"{path}: unknown task type {task_type!r} (expected one of {', '.join(TASK_TYPES)})")
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    task = Task(name=path.name.removesuffix(".jsonl"), type=task_type or "", path=str(path))
    try:
        _read_examples(path, task, task_type)
    except JsonlError as e:  # not JSON, not an object, not UTF-8: already "FILE:LINE: ..."
        raise TaskError(str(e)) from None
    if not task.examples:
        raise TaskError(f"{path}: no examples to evaluate (every line is empty or has \"split\": \"fewshot\")")
    return task


def _read_examples(path: Path, task: Task, task_type: str | None) -> None:
    """Append the file's examples to `task`, checking every line (JsonlError or TaskError on the first bad one)."""
    seen: dict[str, int] = {}
    for lineno, obj in read_jsonl(path):
        line = _Line(str(path), lineno, obj)
        kind = obj.get("type", task_type)
        if kind not in TASK_TYPES:
            raise line.error("type", f"one of {', '.join(TASK_TYPES)} (or pass a task type for the whole file)")
        if task.type and kind != task.type:
            raise TaskError(f"{path}:{lineno}: field \"type\": {kind!r} in a {task.type!r} file "
                            "(one task type per file)")
        task.type = kind
        split = obj.get("split", "test")
        if split not in SPLITS:
            raise line.error("split", f"one of {', '.join(SPLITS)}")
        example = _parse_example(line, kind, lineno)
        if example.id in seen:
            raise TaskError(f"{path}:{lineno}: field \"id\": {example.id!r} repeats line {seen[example.id]}")
        seen[example.id] = lineno
        (task.fewshot if split == "fewshot" else task.examples).append(example)
