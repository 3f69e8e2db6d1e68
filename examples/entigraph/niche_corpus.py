"""A small "niche" corpus with closed-book questions, on every machine: standard-library modules, in QuALITY's format.

Each article is one standard-library module: a line per public function, "MODULE.NAME(SIGNATURE): the first
paragraph of its docstring". Each question quotes one of those descriptions (the function's name blanked out)
and asks which function it describes; the options are that function and three others of the same module,
shuffled with a seed from the function's name. The file is written in QuALITY's released JSONL shape
(article_id, set_unique_id, title, author, article, questions with 4 options and a 1-based gold_label), so the
recipe imports it with tools/import_quality.py exactly as it imports QuALITY itself.

Facts new to the base model: `make demo` pretrains on the standard library's docstrings of at least 200
characters (megasynth.data.stdlib_corpus, minus its 5% held-out split); a function enters this corpus only if
its docstring is shorter than that or held out, so the descriptions are not in the base model's training data.

    python examples/entigraph/niche_corpus.py --out niche.jsonl [--modules N] [--questions-per-module K]
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import random
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megasynth.data.stdlib_corpus import is_heldout  # noqa: E402
from megasynth.io import atomic_write_text  # noqa: E402

# Modules with at least four short, public, documented functions on CPython 3.10-3.13 (missing ones are skipped).
CANDIDATES = ("heapq", "base64", "calendar", "quopri", "linecache", "operator", "pprint", "shutil", "codecs",
              "dis", "platform", "stat", "locale", "warnings", "email/utils", "urllib/parse", "tempfile", "posixpath")
DEMO_MIN_CHARS, DEMO_VALID_FRACTION = 200, 0.05  # megasynth.data.stdlib_corpus's defaults, used by `make demo`
MIN_DESC, MAX_DESC = 25, 300


def _signature(node: ast.FunctionDef) -> str:
    args = copy.deepcopy(node.args)
    for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
        if a is not None:
            a.annotation = None
    return f"({ast.unparse(args)})"


def module_functions(relpath: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(dotted module name, [(function name, signature, description)]) of one stdlib file's eligible functions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    path = root / f"{relpath}.py"
    tree = ast.parse(path.read_bytes())
    origin_module = ".".join(path.relative_to(root).with_suffix("").parts)  # as stdlib_corpus names origins
    name = relpath.replace("/", ".")
    functions, seen = [], set()
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        desc = " ".join(doc.strip().split("\n\n")[0].split())
        in_demo = len(doc) >= DEMO_MIN_CHARS and not is_heldout(f"{origin_module}.{node.name}", DEMO_VALID_FRACTION)
        if in_demo or not MIN_DESC <= len(desc) <= MAX_DESC or desc in seen or node.name in seen:
            continue  # a repeated name would make two identical options
        seen.update((desc, node.name))
        functions.append((node.name, _signature(node), desc))
    return name, functions


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "little")


def build_records(num_modules: int = 0, questions_per_module: int = 8) -> list[dict]:
    """QuALITY-format records, one per module (the first `num_modules` eligible ones; 0 = all)."""
    records = []
    for relpath in CANDIDATES:
        if not (Path(sysconfig.get_paths()["stdlib"]) / f"{relpath}.py").is_file():
            continue
        module, functions = module_functions(relpath)
        if len(functions) < 4:
            continue
        article = "\n".join(f"{module}.{name}{sig}: {desc}" for name, sig, desc in functions)
        questions = []
        for i, (name, _, desc) in enumerate(functions[:questions_per_module]):
            rng = random.Random(_seed(module, name))
            others = rng.sample([f for f, _, _ in functions if f != name], 3)
            options = [name, *others]
            rng.shuffle(options)
            blanked = desc.replace(name, "___")
            questions.append({
                "question": f"Which function of the {module} module is described as follows: \"{blanked}\"",
                "question_unique_id": f"{module}_{i + 1}", "options": options,
                "gold_label": options.index(name) + 1, "writer_label": options.index(name) + 1,
                "difficult": 0})
        records.append({"article_id": module, "set_unique_id": f"{module}_0", "source": "Python standard library",
                        "title": f"The {module} module", "author": "Python Software Foundation",
                        "article": f"The {module} module\n\n{article}", "questions": questions})
        if num_modules and len(records) == num_modules:
            break
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the QuALITY-format JSONL file to write")
    parser.add_argument("--modules", type=int, default=0, help="number of modules (articles); 0 = all eligible")
    parser.add_argument("--questions-per-module", type=int, default=8, help="at most this many questions per module")
    args = parser.parse_args(argv)
    records = build_records(args.modules, args.questions_per_module)
    atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"{len(records)} articles, {sum(len(r['questions']) for r in records)} questions -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
