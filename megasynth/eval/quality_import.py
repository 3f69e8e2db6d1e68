"""QuALITY's released JSONL -> source documents + a closed-book `quality` task file (tools/import_quality.py).

    result = read_quality(["QuALITY.v1.0.1.htmlstripped.train"], skip_bad=False)
    split = split_articles(result.articles, held_out_fraction=0.2, seed=0)     # or split_by_files(...)
    write_import(out_dir, result, split, fewshot=5, seed=0, settings={...})

Merging, de-duplication, bad records and the output files: docs/eval.md ("Importing QuALITY").
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megasynth.data.readers import BadInputError, InputReader, ReaderOptions, RecordProblem, parse_json_chunk
from megasynth.io import atomic_files

NUM_OPTIONS = 4  # every QuALITY question has four options
HTML_MODES = ("auto", "strip", "keep")
# Every file write_import may put in its output directory (the held-out pair only with a split); --overwrite
# replaces these and nothing else.
OUTPUT_FILES = ("documents.jsonl", "quality.jsonl", "heldout_documents.jsonl", "quality_heldout.jsonl", "import.json")
_LOOKS_HTML = re.compile(r"<\s*(html|body|p|br|div|h[1-6])\b[^>]*>", re.IGNORECASE)


@dataclass
class Question:
    id: str  # question_unique_id (or a content hash when a release has none)
    question: str
    options: list[str]
    gold: int  # 0-based (QuALITY's gold_label - 1)
    difficult: bool
    where: str  # FILE:LINE of the record it came from


@dataclass
class Article:
    id: str
    title: str
    author: str
    text: str
    where: str  # FILE:LINE of the first record holding it
    questions: list[Question] = field(default_factory=list)


@dataclass
class ImportResult:
    articles: dict[str, Article]  # by article_id, in order of first appearance
    lines: int = 0  # records read (kept lines, not counting skipped ones)
    duplicate_questions: int = 0
    text_conflicts: list[str] = field(default_factory=list)  # "FILE:LINE: article X differs from FILE:LINE"
    skipped_bad: int = 0
    bad_examples: list[str] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)


# -- HTML -----------------------------------------------------------------------------------------------------------
class _TextExtractor(html.parser.HTMLParser):
    """Paragraph text of an HTML article: block tags end paragraphs, <head>/<script>/<style> are dropped."""

    BLOCKS = {"p", "div", "br", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "pre", "blockquote", "hr",
              "table", "ul", "ol", "body", "html"}
    HIDDEN = {"head", "script", "style", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.current: list[str] = []
        self.hidden = 0

    def _flush(self) -> None:
        text = " ".join("".join(self.current).split())
        if text:
            self.paragraphs.append(text)
        self.current = []

    def handle_starttag(self, tag, attrs):
        if tag in self.HIDDEN:
            self.hidden += 1
        elif tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag):
        if tag in self.HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data):
        if not self.hidden:
            self.current.append(data)


def html_to_text(text: str) -> str:
    """Plain text of an HTML article: one paragraph per block element, blank lines between them."""
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    parser._flush()
    return "\n\n".join(parser.paragraphs)


def clean_article(text: str, mode: str = "auto") -> str:
    """The article's text: HTML converted (mode "strip", or "auto" when it looks like HTML), trailing spaces and
    surrounding blank lines removed."""
    if mode not in HTML_MODES:
        raise ValueError(f"html mode must be one of {HTML_MODES}, got {mode!r}")
    if mode == "strip" or (mode == "auto" and _LOOKS_HTML.search(text)):
        text = html_to_text(text)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


# -- records --------------------------------------------------------------------------------------------------------
def _json_short(value) -> str:
    return json.dumps(value, ensure_ascii=False)[:60]


def _string(obj: dict, name: str, where: str = "") -> str:
    if name not in obj:
        raise RecordProblem(f"{where}{name}: missing (expected a string)")
    value = obj[name]
    if not isinstance(value, str) or not value.strip():
        raise RecordProblem(f"{where}{name}: expected a non-empty string, got {_json_short(value)}")
    return value


def _parse_question(q, i: int, article_id: str) -> tuple[str | None, str, list[str], int, bool]:
    where = f"questions[{i}]."
    if not isinstance(q, dict):
        raise RecordProblem(f"questions[{i}]: expected an object, got {_json_short(q)}")
    question = _string(q, "question", where)
    options = q.get("options")
    if "options" not in q:
        raise RecordProblem(f"{where}options: missing (expected a list of {NUM_OPTIONS} strings)")
    if not isinstance(options, list) or len(options) != NUM_OPTIONS:
        got = f"{len(options)} options" if isinstance(options, list) else _json_short(options)
        raise RecordProblem(f"{where}options: expected a list of {NUM_OPTIONS} strings, got {got}")
    for j, option in enumerate(options):
        if not isinstance(option, str) or not option.strip():
            raise RecordProblem(f"{where}options[{j}]: expected a non-empty string, got {_json_short(option)}")
    if "gold_label" not in q:
        raise RecordProblem(f"{where}gold_label: missing (expected an integer 1..{NUM_OPTIONS}; QuALITY's test "
                            "split has no public labels, use its train or dev file)")
    gold = q["gold_label"]
    if isinstance(gold, bool) or not isinstance(gold, int) or not 1 <= gold <= NUM_OPTIONS:
        raise RecordProblem(f"{where}gold_label: expected an integer 1..{NUM_OPTIONS} (QuALITY numbers the options "
                            f"from 1), got {_json_short(gold)}")
    qid = q.get("question_unique_id")
    if qid is not None and (isinstance(qid, bool) or not isinstance(qid, (str, int)) or str(qid) == ""):
        raise RecordProblem(f"{where}question_unique_id: expected a string, got {_json_short(qid)}")
    if qid is None:  # older releases: an id from the content, stable across runs and files
        digest = hashlib.sha1(json.dumps([article_id, question, options]).encode()).hexdigest()[:12]
        qid = f"{article_id}-{digest}"
    difficult = q.get("difficult", 0)
    return str(qid), question, [str(o) for o in options], gold - 1, bool(difficult)


def parse_record(obj: dict, html_mode: str = "auto") -> dict:
    """One QuALITY line checked and normalised (RecordProblem names the bad field)."""
    raw_id = obj.get("article_id")
    if "article_id" not in obj:
        raise RecordProblem("article_id: missing (expected a string)")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id).strip() == "":
        raise RecordProblem(f"article_id: expected a non-empty string, got {_json_short(raw_id)}")
    article_id = str(raw_id)
    title = _string(obj, "title")
    author = obj.get("author") if isinstance(obj.get("author"), str) else ""
    text = clean_article(_string(obj, "article"), html_mode)
    if not text:
        raise RecordProblem("article: no text left after removing the HTML markup")
    questions = obj.get("questions")
    if "questions" not in obj:
        raise RecordProblem("questions: missing (expected a list of question objects)")
    if not isinstance(questions, list):
        raise RecordProblem(f"questions: expected a list of question objects, got {_json_short(questions)}")
    parsed = [_parse_question(q, i, article_id) for i, q in enumerate(questions)]
    return {"article_id": article_id, "title": title.strip(), "author": author.strip(), "text": text,
            "questions": parsed}


def read_quality(inputs: Sequence[str | os.PathLike], *, skip_bad: bool = False, html_mode: str = "auto",
                 max_bad_shown: int = 5) -> ImportResult:
    """Every article and question of QuALITY JSONL files (any name, optionally .gz/.zst), merged by article."""
    reader = InputReader(inputs, ReaderOptions(input_format="jsonl", skip_bad=skip_bad, batch_size=256,
                                               max_bad_shown=max_bad_shown))
    result = ImportResult(articles={})
    seen_ids: set[str] = set()
    seen_content: set[str] = set()
    for chunk in reader.chunks():
        parsed, records = parse_json_chunk(chunk, lambda obj, line: parse_record(obj, html_mode), skip_bad)
        reader.stats.record(parsed)
        for where, rec in zip(parsed.locations(), records):
            result.lines += 1
            article = result.articles.get(rec["article_id"])
            if article is None:
                article = Article(rec["article_id"], rec["title"], rec["author"], rec["text"], where)
                result.articles[article.id] = article
            elif " ".join(rec["text"].split()) != " ".join(article.text.split()):
                result.text_conflicts.append(f"{where}: article {article.id!r} has a different text than at "
                                             f"{article.where}; the first is kept")
            for qid, question, options, gold, difficult in rec["questions"]:
                content = json.dumps([article.id, " ".join(question.split()), options])
                if qid in seen_ids or content in seen_content:
                    result.duplicate_questions += 1
                    continue
                seen_ids.add(qid)
                seen_content.add(content)
                article.questions.append(Question(qid, question, options, gold, difficult, where))
    result.skipped_bad = reader.stats.skipped_bad
    result.bad_examples = reader.stats.bad_examples
    result.sources = reader.sources
    return result


# -- split ----------------------------------------------------------------------------------------------------------
def _rank(seed: int, article_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{article_id}".encode()).hexdigest()


def split_articles(articles: dict[str, Article], held_out_fraction: float, seed: int) -> set[str]:
    """The held-out article ids: a seeded fraction (at least one, never all), chosen by a hash of (seed, id),
    so an article's side does not depend on the order or the other files of the input."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held-out fraction must be between 0 and 1 (exclusive), got {held_out_fraction}")
    if len(articles) < 2:
        raise ValueError(f"a split by article needs at least 2 articles, the input has {len(articles)}")
    count = min(len(articles) - 1, max(1, round(held_out_fraction * len(articles))))
    return set(sorted(articles, key=lambda a: _rank(seed, a))[:count])


def merge_held_out(result: ImportResult, held_out: ImportResult) -> set[str]:
    """Add the articles of explicit held-out files (e.g. QuALITY's dev file) to `result`; returns their ids.
    An article in both is a leak of the evaluated books into the corpus: an error."""
    both = sorted(set(result.articles) & set(held_out.articles))
    if both:
        a = result.articles[both[0]]
        raise BadInputError(held_out.articles[both[0]].where,
                            f"article {both[0]!r} is also in the training input ({a.where}); "
                            f"{len(both)} article(s) in both")
    result.articles.update(held_out.articles)
    for name in ("lines", "duplicate_questions", "text_conflicts", "skipped_bad", "bad_examples", "sources"):
        setattr(result, name, getattr(result, name) + getattr(held_out, name))
    return set(held_out.articles)


# -- output ---------------------------------------------------------------------------------------------------------
def _document(a: Article) -> dict:
    return {"id": a.id, "title": a.title, "text": a.text}


def _task_line(a: Article, q: Question, split: str = "test") -> dict:
    line = {"type": "quality", "id": q.id, "article_id": a.id, "title": a.title, "question": q.question,
            "options": q.options, "gold": q.gold, "difficult": q.difficult}
    if split != "test":
        line["split"] = split
    return line


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:  # inside atomic_files' temp directory: published when complete
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_import(out: str | os.PathLike, result: ImportResult, held_out: set[str], *, fewshot: int = 0,
                 seed: int = 0, settings: dict | None = None, overwrite: bool = False) -> dict:
    """Write the output files into `out` (megasynth.io.atomic_files: they appear complete, with import.json last;
    other files in `out` are left alone, and existing OUTPUT_FILES need `overwrite`); returns import.json's content.
    `held_out` (possibly empty) names the articles kept out of documents.jsonl; `fewshot` questions drawn (seeded)
    from them join quality.jsonl as "split": "fewshot" lines (without a split: drawn from all questions, which
    are then not evaluated)."""
    train = [a for a in result.articles.values() if a.id not in held_out]
    held = [a for a in result.articles.values() if a.id in held_out]
    if not train:
        raise ValueError("no article left for the corpus")
    pool = [(a, q) for a in (held or train) for q in a.questions]
    if fewshot > len(pool):
        raise ValueError(f"--fewshot {fewshot}: only {len(pool)} questions to draw from")
    shots = random.Random(seed).sample(pool, fewshot) if fewshot else []
    shot_ids = {q.id for _, q in shots}
    tests = [(a, q) for a in train for q in a.questions if held or q.id not in shot_ids]
    if not tests:
        raise ValueError("no question left to evaluate on the corpus's articles")
    files = {"documents": "documents.jsonl", "task": "quality.jsonl"}
    if held:
        files.update(heldout_documents="heldout_documents.jsonl", heldout_task="quality_heldout.jsonl")
    summary = {
        "tool": "tools/import_quality.py",
        "settings": settings or {},
        "sources": result.sources,
        "lines": result.lines,
        "articles": len(train), "questions": len(tests),
        "heldout_articles": len(held), "heldout_questions": sum(len(a.questions) for a in held),
        "fewshot": len(shots),
        "duplicate_questions": result.duplicate_questions,
        "text_conflicts": len(result.text_conflicts), "text_conflict_examples": result.text_conflicts[:5],
        "skipped_bad": result.skipped_bad, "bad_examples": result.bad_examples,
        "files": files,
    }
    with atomic_files(out, OUTPUT_FILES, commit="import.json", replace=overwrite) as tmp:
        _write_jsonl(tmp / files["documents"], map(_document, train))
        _write_jsonl(tmp / files["task"], [_task_line(a, q, "fewshot") for a, q in shots]
                     + [_task_line(a, q) for a, q in tests])
        if held:
            _write_jsonl(tmp / files["heldout_documents"], map(_document, held))
            _write_jsonl(tmp / files["heldout_task"], [_task_line(a, q) for a in held for q in a.questions])
        (tmp / "import.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary
