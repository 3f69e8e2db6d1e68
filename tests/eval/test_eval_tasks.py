"""Task files: the three schemas parse, and every kind of malformed line is an error naming FILE:LINE and field."""

import json

import pytest

from megasynth.eval.tasks import GenerativeExample, QualityExample, TaskError, load_task


def write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def test_three_types_parse_with_splits_and_default_ids(tmp_path):
    mc = load_task(write(tmp_path / "mc.jsonl", [
        {"type": "multiple_choice", "context": "2 + 2 =", "choices": ["4", "5"], "gold": 0},
        "",  # blank lines are skipped
        {"type": "multiple_choice", "id": "shot", "context": "1 + 1 =", "choices": ["2", "3"], "gold": 0,
         "split": "fewshot"},
    ]))
    assert mc.name == "mc" and mc.type == "multiple_choice"
    assert [e.id for e in mc.examples] == ["1"] and [e.id for e in mc.fewshot] == ["shot"]
    gen = load_task(write(tmp_path / "qa.jsonl", [{"prompt": "Q: x\nA:", "answers": ["y", "z"], "extra": 1}]),
                    task_type="generative")
    assert gen.examples == [GenerativeExample("1", 1, "Q: x\nA:", ["y", "z"])]
    q = load_task(write(tmp_path / "q.jsonl", [{"type": "quality", "id": 7, "article_id": 52845, "question": "Why?",
                                                  "options": ["a", "b", "c", "d"], "gold": 3}]))
    assert q.examples == [QualityExample("7", 1, "52845", "", "Why?", ["a", "b", "c", "d"], 3)]


GOOD = {"type": "multiple_choice", "context": "c", "choices": ["a", "b"], "gold": 1}


@pytest.mark.parametrize("bad, message", [
    ('{"type": "multiple_choice", "context": "c",', r"bad\.jsonl:2: not valid JSON"),
    ('["not", "an", "object"]', r"bad\.jsonl:2: expected a JSON object, got list"),
    ({**GOOD, "type": "essay"}, r'bad\.jsonl:2: field "type": expected one of multiple_choice, generative, quality'),
    ({**GOOD, "gold": 2}, r'bad\.jsonl:2: field "gold": expected an integer index into the 2 choices .*got 2'),
    ({**GOOD, "gold": True}, r'bad\.jsonl:2: field "gold"'),
    ({**GOOD, "choices": ["only one"]}, r'bad\.jsonl:2: field "choices": expected a list of at least 2'),
    ({**GOOD, "choices": ["a", ""]}, r'bad\.jsonl:2: field "choices"'),
    ({k: v for k, v in GOOD.items() if k != "context"}, r'bad\.jsonl:2: field "context": expected a string, missing'),
    ({**GOOD, "split": "train"}, r'bad\.jsonl:2: field "split": expected one of test, fewshot'),
    ({**GOOD, "id": "1"}, r'bad\.jsonl:2: field "id": \'1\' repeats line 1'),
    ({"type": "generative", "prompt": "p", "answers": []}, r"bad\.jsonl:2: field \"type\": 'generative' in a "
                                                           r"'multiple_choice' file"),
])
def test_malformed_lines_name_file_line_and_field(tmp_path, bad, message):
    path = write(tmp_path / "bad.jsonl", [{**GOOD, "id": "1"}, bad])
    with pytest.raises(TaskError, match=message):
        load_task(path)


@pytest.mark.parametrize("line, message", [
    ({"type": "generative", "prompt": "p", "answers": "one"}, r'x\.jsonl:1: field "answers": expected a list'),
    ({"type": "generative", "prompt": " ", "answers": ["a"]}, r'x\.jsonl:1: field "prompt": expected a non-empty'),
    ({"type": "quality", "question": "q", "options": ["a", "b"], "gold": 0}, r'x\.jsonl:1: field "article_id"'),
    ({"type": "quality", "article_id": "1", "question": "q", "options": ["a", "b"], "gold": 0, "title": 3},
     r'x\.jsonl:1: field "title": expected a non-empty string, got 3'),
])
def test_generative_and_quality_fields(tmp_path, line, message):
    with pytest.raises(TaskError, match=message):
        load_task(write(tmp_path / "x.jsonl", [line]))


def test_file_level_errors(tmp_path):
    with pytest.raises(TaskError, match="no such task file"):
        load_task(tmp_path / "missing.jsonl")
    with pytest.raises(TaskError, match="no examples to evaluate"):
        load_task(write(tmp_path / "pool.jsonl", [{**GOOD, "split": "fewshot"}]))
    with pytest.raises(TaskError, match=r"no_type\.jsonl:1: field \"type\""):
        load_task(write(tmp_path / "no_type.jsonl", [{"context": "c", "choices": ["a", "b"], "gold": 0}]))
    with pytest.raises(TaskError, match="unknown task type 'mc'"):
        load_task(tmp_path / "pool.jsonl", task_type="mc")
