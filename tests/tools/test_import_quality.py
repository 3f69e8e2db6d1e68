"""tools/import_quality.py on QuALITY-format files built here (the release's shape: one line per article and writer
set, 4 options, 1-based gold_label): articles merged, questions kept once, the task file loads with tools/eval.py's
loader, HTML stripped, seeded and file-based splits by article, FILE:LINE errors and --skip-bad-lines."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megasynth.data.readers import BadInputError
from megasynth.eval.quality_import import read_quality, split_articles
from megasynth.eval.tasks import load_task
from megasynth.io import read_jsonl

ROOT = Path(__file__).resolve().parents[2]

# Real text (from the Python standard library's documentation) so the files look like what the tool reads.
ARTICLES = {
    "20001": ("The heapq module",
              "This module provides an implementation of the heap queue algorithm, also known as the priority "
              "queue algorithm.\n\nHeaps are binary trees for which every parent node has a value less than or "
              "equal to any of its children. The smallest element is always the root, heap[0].",
              [("What is the smallest element of a heap?", ["heap[-1]", "heap[0]", "heap[1]", "the last pushed"], 2),
               ("What is another name of the heap queue algorithm?",
                ["the priority queue algorithm", "the stack algorithm", "merge sort", "binary search"], 1)]),
    "20002": ("The textwrap module",
              "The textwrap module provides some convenience functions, as well as TextWrapper, the class that "
              "does all the work. If you are just wrapping or filling one or two text strings, the convenience "
              "functions should be good enough.",
              [("Which class does all the work?", ["TextFiller", "Wrapper", "TextWrapper", "StringWrap"], 3),
               ("When are the convenience functions good enough?",
                ["for one or two strings", "never", "for binary files", "for HTML"], 1)]),
    "20003": ("The bisect module",
              "This module provides support for maintaining a list in sorted order without having to sort the "
              "list after each insertion. For long lists of items with expensive comparison operations, this can "
              "be an improvement over linear searches or frequent resorting.",
              [("What does the module keep sorted?", ["a dict", "a set", "a list", "a tuple"], 3)]),
    "20004": ("The zlib module",
              "For applications that require data compression, the functions in this module allow compression "
              "and decompression, using the zlib library.",
              [("Which library does the module use?", ["bz2", "lzma", "zlib", "gzip"], 3)]),
}


def record(article_id, set_no, questions, *, html=False, **overrides):
    """One line as QuALITY releases it (v1.0.1 shape, the fields the README documents)."""
    title, text, _ = ARTICLES[article_id]
    if html:
        paragraphs = "".join(f"<p>\n{p}\n</p>\n" for p in text.split("\n\n"))
        text = f"<html>\n<head><title>{title}</title></head>\n<body>\n<h1>{title}</h1>\n{paragraphs}</body>\n</html>"
    set_id = f"{article_id}_SET{set_no}"
    rec = {"article_id": article_id, "set_unique_id": set_id, "batch_num": "7", "writer_id": f"10{set_no}",
           "source": "Gutenberg", "title": title, "year": 1959, "author": "Python Software Foundation",
           "topic": "programming", "article": text, "url": "https://docs.python.org/3/library/",
           "license": "PSF", "questions": []}
    for i, (question, options, gold) in enumerate(questions, 1):
        rec["questions"].append({
            "question": question, "question_unique_id": f"{set_id}_{i}", "options": options,
            "writer_label": gold, "gold_label": gold, "difficult": i % 2,
            "validation": [{"untimed_annotator_id": "0019", "untimed_answer": gold, "untimed_eval1_answerability": 1,
                            "untimed_eval2_context": 2, "untimed_best_distractor": 1}],
            "speed_validation": [{"speed_annotator_id": "0020", "speed_answer": gold}]})
    rec.update(overrides)
    return rec


def standard_lines():
    """Each article on two lines (two writer sets), one question repeated verbatim by a second writer."""
    lines = []
    for aid, (_, _, qs) in ARTICLES.items():
        lines.append(record(aid, 1, qs[:1], html=aid == "20002"))
        again = qs[1:] + qs[:1] if len(qs) > 1 else qs  # qs[0] again: a duplicate
        lines.append(record(aid, 2, again, html=aid == "20002"))
    return lines


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def run_tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "import_quality.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_round_trip_into_the_eval_task_loader(tmp_path):
    src = write_lines(tmp_path / "QuALITY.v1.0.1.train", standard_lines())
    out = tmp_path / "q"
    result = run_tool("--input", src, "--out", out)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    docs = [obj for _, obj in read_jsonl(out / "documents.jsonl")]
    assert [d["id"] for d in docs] == list(ARTICLES)  # one document per article, in order of first appearance
    assert all(set(d) == {"id", "title", "text"} for d in docs)
    heap = docs[0]
    assert heap["title"] == "The heapq module" and heap["text"] == ARTICLES["20001"][1]
    # The HTML line became plain paragraphs (the <h1> heading is one); the <head> and the tags are gone.
    assert docs[1]["text"] == "The textwrap module\n\n" + ARTICLES["20002"][1]

    task = load_task(out / "quality.jsonl")
    assert task.type == "quality" and task.fewshot == []
    expected = {(aid, q, tuple(opts), gold - 1) for aid, (_, _, qs) in ARTICLES.items() for q, opts, gold in qs}
    got = [(ex.article_id, ex.question, tuple(ex.options), ex.gold) for ex in task.examples]
    assert len(got) == len(set(got)) == len(expected) and set(got) == expected  # each question once, gold 0-based
    assert {ex.title for ex in task.examples} == {t for t, _, _ in ARTICLES.values()}
    assert task.examples[0].id == "20001_SET1_1"  # QuALITY's question_unique_id
    summary = json.loads((out / "import.json").read_text())
    assert summary["lines"] == 8 and summary["articles"] == 4 and summary["questions"] == 6
    assert summary["duplicate_questions"] == 4 and summary["heldout_articles"] == 0
    assert summary["sources"][0]["path"] == str(src.resolve())

    again = run_tool("--input", src, "--out", out)  # an existing output is refused, then replaced on request
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert run_tool("--input", src, "--out", out, "--overwrite").returncode == 0


def test_split_by_article_is_seeded_disjoint_and_order_independent(tmp_path):
    lines = standard_lines()
    a = write_lines(tmp_path / "a.jsonl", lines)
    b = write_lines(tmp_path / "b.jsonl", lines[::-1])
    outs = []
    for name, src in (("a", a), ("b", b)):
        result = run_tool("--input", src, "--out", tmp_path / name, "--split-by-article", "--held-out-fraction",
                          "0.5", "--seed", "3", "--fewshot", "2")
        assert result.returncode == 0, result.stderr
        outs.append(tmp_path / name)
    sides = []
    for out in outs:
        train = {d["id"] for _, d in read_jsonl(out / "documents.jsonl")}
        held = {d["id"] for _, d in read_jsonl(out / "heldout_documents.jsonl")}
        assert len(train) == len(held) == 2 and not train & held and train | held == set(ARTICLES)
        task, control = load_task(out / "quality.jsonl"), load_task(out / "quality_heldout.jsonl")
        assert {ex.article_id for ex in task.examples} == train
        assert {ex.article_id for ex in control.examples} == held
        # The few-shot pool comes from held-out books, so no shot gives an evaluated answer away.
        assert len(task.fewshot) == 2 and {ex.article_id for ex in task.fewshot} <= held
        sides.append((train, held))
    assert sides[0] == sides[1]  # the side of an article does not depend on the order of the lines
    # The library's choice: a hash of (seed, id), so another seed may move articles, never losing one.
    result = read_quality([a])
    assert split_articles(result.articles, 0.5, 3) == sides[0][1]
    other = split_articles(result.articles, 0.25, 4)
    assert len(other) == 1 and other <= set(ARTICLES)


def test_held_out_files_and_leak_detection(tmp_path):
    lines = standard_lines()
    train = write_lines(tmp_path / "train.jsonl", lines[:4])  # articles 20001, 20002
    dev = write_lines(tmp_path / "dev.jsonl", lines[4:])  # articles 20003, 20004
    result = run_tool("--input", train, "--held-out", dev, "--out", tmp_path / "q")
    assert result.returncode == 0, result.stderr
    assert [d["id"] for _, d in read_jsonl(tmp_path / "q" / "documents.jsonl")] == ["20001", "20002"]
    assert {ex.article_id for ex in load_task(tmp_path / "q" / "quality_heldout.jsonl").examples} == {"20003", "20004"}
    leaky = write_lines(tmp_path / "leaky.jsonl", lines[3:])  # 20002's second set is in both
    result = run_tool("--input", train, "--held-out", leaky, "--out", tmp_path / "q2")
    assert result.returncode == 2 and not (tmp_path / "q2").exists()
    assert f"{leaky}:1: article '20002' is also in the training input ({train}:3)" in result.stderr


BAD_RECORDS = [
    (record("20001", 1, [("Q?", ["a", "b", "c", "d"], 5)]), 'questions[0].gold_label: expected an integer 1..4'),
    (record("20001", 1, [("Q?", ["a", "b", "c", "d"], 0)]), 'questions[0].gold_label: expected an integer 1..4'),
    (record("20001", 1, [("Q?", ["a", "b", "c"], 1)]), "questions[0].options: expected a list of 4 strings, got 3"),
    (record("20001", 1, [("Q?", ["a", "b", "", "d"], 1)]), "questions[0].options[2]: expected a non-empty string"),
    (record("20001", 1, [("", ["a", "b", "c", "d"], 1)]), "questions[0].question: expected a non-empty string"),
    ({k: v for k, v in record("20001", 1, []).items() if k != "article"}, "article: missing"),
    ({k: v for k, v in record("20001", 1, []).items() if k != "article_id"}, "article_id: missing"),
    ({**record("20001", 1, []), "questions": "none"}, "questions: expected a list"),
    ('{"article_id": "20001", "title": ', "invalid JSON"),
]


@pytest.mark.parametrize("bad, message", BAD_RECORDS)
def test_malformed_records_name_file_line_and_field(tmp_path, bad, message):
    path = write_lines(tmp_path / "bad.jsonl", [record("20003", 1, ARTICLES["20003"][2]), bad])
    with pytest.raises(BadInputError) as e:
        read_quality([path])
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)
    skipped = read_quality([path], skip_bad=True)
    assert list(skipped.articles) == ["20003"] and skipped.skipped_bad == 1


def test_test_split_without_labels_is_explained(tmp_path):
    rec = record("20004", 1, ARTICLES["20004"][2])
    for q in rec["questions"]:
        del q["gold_label"], q["writer_label"]
    with pytest.raises(BadInputError, match="gold_label: missing .*test split has no public labels"):
        read_quality([write_lines(tmp_path / "test.jsonl", [rec])])


def test_cli_errors_exit_2_with_one_line_and_skip_bad_lines(tmp_path):
    lines = standard_lines()
    lines.insert(2, record("20004", 3, [("Q?", ["a", "b", "c", "d"], 7)]))
    src = write_lines(tmp_path / "mixed.jsonl", lines)
    result = run_tool("--input", src, "--out", tmp_path / "q")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {src}:3: questions[0].gold_label: expected an integer 1..4 "
                                     "(QuALITY numbers the options from 1), got 7")
    assert not (tmp_path / "q").exists()
    result = run_tool("--input", src, "--out", tmp_path / "q", "--skip-bad-lines")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 bad line" in result.stderr and f"{src}:3:" in result.stderr
    assert len(load_task(tmp_path / "q" / "quality.jsonl").examples) == 6
    assert json.loads((tmp_path / "q" / "import.json").read_text())["skipped_bad"] == 1
    missing = run_tool("--input", tmp_path / "nothing.jsonl", "--out", tmp_path / "q3")
    assert missing.returncode == 2 and "nothing.jsonl" in missing.stderr and "Traceback" not in missing.stderr


def test_conflicting_article_texts_are_reported_not_merged(tmp_path):
    lines = standard_lines()
    lines[1]["article"] = "A different text."
    src = write_lines(tmp_path / "c.jsonl", lines)
    result = read_quality([src])
    assert result.articles["20001"].text == ARTICLES["20001"][1]
    assert result.text_conflicts == [f"{src}:2: article '20001' has a different text than at {src}:1; "
                                     "the first is kept"]
