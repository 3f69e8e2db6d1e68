"""An instruction set that exists wherever Python does: questions about standard-library functions.

Each example asks "What does MODULE.FUNCTION(SIGNATURE) do?" and answers with the first paragraph of that
function's docstring. The functions are read from the standard library's source with `ast` (nothing is
imported, so no module runs code and the set is the same on every machine with the same Python); methods of
public classes count too (MODULE.CLASS.METHOD). Examples are split into train and held-out sets by a hash of
the function's qualified name, and written in two formats: even-numbered examples as Alpaca records
({"instruction", "input", "output"}), odd-numbered ones as chat records ({"messages": [user, assistant]}).

    python examples/sft/instructions.py --out DIR [--limit N]   # DIR/{train,valid}_{alpaca,chat}.jsonl
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megasynth.data.stdlib_corpus import _stdlib_files, is_heldout  # noqa: E402
from megasynth.io import atomic_write_text  # noqa: E402

MIN_ANSWER, MAX_ANSWER = 40, 400  # characters: long enough to say something, short enough for one window


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> str:
    args = copy.deepcopy(node.args)
    if method:  # drop self / cls
        if args.posonlyargs:
            args.posonlyargs = args.posonlyargs[1:]
        elif args.args:
            args.args = args.args[1:]
        positional = len(args.posonlyargs) + len(args.args)
        args.defaults = args.defaults[len(args.defaults) - positional:] if len(args.defaults) > positional else args.defaults
    for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
        if a is not None:
            a.annotation = None  # annotations make long, noisy questions
    return f"({ast.unparse(args)})"


def iter_function_docs() -> Iterator[tuple[str, str, str]]:
    """(qualified name, signature, answer) for public functions and methods with a usable docstring."""
    root = _stdlib_root()
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        parts = path.relative_to(root).with_suffix("").parts
        if any(p.startswith("_") and p != "__init__" for p in parts):
            continue  # private modules
        module = ".".join(p for p in parts if p != "__init__")
        for node in tree.body:
            targets = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                targets.append((node, f"{module}.{node.name}", False))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                targets += [(m, f"{module}.{node.name}.{m.name}", not _is_static(m)) for m in node.body
                            if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for fn, name, method in targets:
                if fn.name.startswith("_"):
                    continue
                doc = ast.get_docstring(fn)
                answer = _first_paragraph(doc) if doc else ""
                if MIN_ANSWER <= len(answer) <= MAX_ANSWER:
                    yield name, _signature(fn, method), answer


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_static(fn) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)


def question(name: str, signature: str) -> str:
    return f"What does {name}{signature} do?"


def write_instruction_set(out_dir: str | Path, *, limit: int = 0, valid_fraction: float = 0.05) -> dict:
    """Write DIR/{train,valid}_{alpaca,chat}.jsonl atomically; return the counts per file.

    `limit` > 0 keeps the first `limit` examples (in the standard library's file order) for quick runs.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {f"{s}_{f}": [] for s in ("train", "valid") for f in ("alpaca", "chat")}
    seen = set()
    for name, sig, answer in iter_function_docs():
        if name in seen:  # a name defined twice in one module (e.g. per platform): keep the first
            continue
        seen.add(name)
        if limit and len(seen) > limit:
            break
        split = "valid" if is_heldout(name, valid_fraction) else "train"
        q = question(name, sig)
        if len(seen) % 2 == 0:
            lines[f"{split}_alpaca"].append(json.dumps({"instruction": q, "input": "", "output": answer}))
        else:
            lines[f"{split}_chat"].append(json.dumps({"messages": [{"role": "user", "content": q},
                                                                   {"role": "assistant", "content": answer}]}))
    for key, rows in lines.items():
        atomic_write_text(out / f"{key}.jsonl", "".join(row + "\n" for row in rows))
    return {key: len(rows) for key, rows in lines.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--limit", type=int, default=0, help="keep only the first N examples (0 = all)")
    parser.add_argument("--valid-fraction", type=float, default=0.05, help="share held out (default 0.05)")
    args = parser.parse_args(argv)
    for key, n in write_instruction_set(args.out, limit=args.limit, valid_fraction=args.valid_fraction).items():
        print(f"{n:6d} examples -> {Path(args.out) / key}.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
