"""A real-text corpus that exists wherever Python does: the standard library's own documentation.

Documents are the docstrings of the standard library's modules, classes and functions (long enough to be
prose), plus the interactive help topics of `pydoc_data` (the language reference text behind `help("if")`).
About 1.8 MB of English and code on CPython 3.11, split deterministically into train and held-out sets by a
hash of each document's origin, so the split never depends on file order or on the machine.

    python -m megasynth.data.stdlib_corpus --out DIR     # writes DIR/train.jsonl and DIR/valid.jsonl
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from megasynth.io import atomic_open

_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in _SKIP_PARTS]  # not entered: site-packages can be huge
        found += (Path(folder) / name for name in names if name.endswith(".py"))
    return sorted(found)


def iter_stdlib_documents(min_chars: int = 200) -> Iterator[tuple[str, str]]:
    """Yield (origin, text): docstrings of at least `min_chars` characters, then pydoc help topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue  # a few stdlib files are templates or use future syntax; they hold no prose we need
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                    yield name, doc
    try:
        from pydoc_data.topics import topics  # noqa: PLC0415
    except ImportError:  # pragma: no cover - some distributions strip pydoc_data
        return
    for name in sorted(topics):
        if len(topics[name]) >= min_chars:
            yield f"pydoc:{name}", topics[name]


def is_heldout(origin: str, valid_fraction: float) -> bool:
    digest = hashlib.sha256(origin.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < valid_fraction


def write_stdlib_corpus(out_dir: str | os.PathLike, valid_fraction: float = 0.05) -> dict:
    """Write train.jsonl and valid.jsonl ({"text", "origin"} per line) atomically; return counts."""
    counts = {"train": [0, 0], "valid": [0, 0]}  # documents, characters
    with contextlib.ExitStack() as stack:
        handles = {split: stack.enter_context(atomic_open(Path(out_dir) / f"{split}.jsonl", "w")) for split in counts}
        for origin, text in iter_stdlib_documents():
            split = "valid" if is_heldout(origin, valid_fraction) else "train"
            handles[split].write(json.dumps({"text": text, "origin": origin}) + "\n")
            counts[split][0] += 1
            counts[split][1] += len(text)
    return {split: {"documents": d, "characters": c} for split, (d, c) in counts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory for train.jsonl and valid.jsonl")
    parser.add_argument("--valid-fraction", type=float, default=0.05, help="share of documents held out (default 0.05)")
    args = parser.parse_args(argv)
    counts = write_stdlib_corpus(args.out, args.valid_fraction)
    for split, c in counts.items():
        print(f"{split}: {c['documents']} documents, {c['characters'] / 1e6:.2f}M characters -> {Path(args.out) / split}.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
