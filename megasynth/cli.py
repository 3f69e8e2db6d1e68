"""What every tool in tools/ checks on its command line before it touches the disk (issue 19): outputs that
would destroy an input, existing outputs without --overwrite, and float flags that are not finite numbers.

    parser = ToolParser(description=__doc__)        # argparse, but a refusal is ONE stderr line, exit 2
    parser.add_argument("--temperature", type=nonnegative_float)   # finite_float, positive_float, unit_float,
                                                                    # float_range(lo, hi, ...) refuse nan/inf
    args = parser.parse_args(argv)
    check_outputs(parser, {"--output-prefix": prefix(args.output_prefix)},
                  {"--input": args.input, "--tokenizer": args.tokenizer})   # exits 2 on a refusal

The overlap rule: an output may never be, contain, or sit inside an input. Paths are compared after
`os.path.realpath` (symlinks and `..` resolved), file by file: an output prefix `data/x` is the files its tool
writes (`TOKEN_SUFFIXES`: .bin, .idx, .json, .mask, .provenance.parquet; or the tool's own, e.g. EMB.npy/.json),
an input prefix every file that may belong to it (`PREFIX_SUFFIXES`), so an output prefix equal to an input
prefix, or to one of its files, is refused, while an output prefix beside an input prefix in the same directory
is fine (`--pairs data/pairs.parquet --output-prefix data/pairs` too: no file in common). A directory output
may not hold an input, and no output may be written inside a directory given as an input (a corpus directory
would read it back), except `run_dir` inputs (a training run: `--out runs/1b/eval` beside its checkpoints is
normal; only its checkpoints/, tokenizer/, config.toml and metrics.jsonl are guarded). A raw string input is any
of: a file, a directory, a prefix, or a glob pattern (expanded).

An existing output needs --overwrite (`check_outputs(..., overwrite=args.overwrite)`; tools whose library checks
that itself, e.g. to resume a finished run, pass nothing). `overlap_refusal` / `output_refusal` are the same
rules without argparse, for library functions (they return the one-line message or None). Directory outputs
are published with `megasynth.io.atomic_files`.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from megasynth.io import owned_names

# The files of a token prefix (the synthetic pipelines add .provenance.parquet): what an output prefix writes
# unless its tool names other suffixes (embeddings: EMB.npy/.json/.embed-work, pair tables: .parquet/.json/.png).
TOKEN_SUFFIXES = (".bin", ".idx", ".json", ".mask", ".provenance.parquet", ".max_token_id.json")
# Every file a prefix-named input can have: an input prefix stands for all of them.
PREFIX_SUFFIXES = TOKEN_SUFFIXES + (".npy", ".embed-work", ".parquet", ".png")


# -- parsing ----------------------------------------------------------------------------------------------------------
class ToolParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one stderr line, `PROG: error: MESSAGE`, and exit code 2 (argparse's
    own prints the usage block first). Every tool in tools/ builds its parser with it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


_FLOAT_TYPES: set[Callable[[str], float]] = set()


def float_range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False, name: str | None = None) -> Callable[[str], float]:
    """An argparse `type=` that accepts finite numbers within the bounds (None: unbounded on that side; `*_open`
    excludes the bound itself) and refuses anything else, nan and inf included, naming what was expected."""
    if low is None and high is None:
        expected = "a finite number"
    elif high is None:
        expected = f"a number {'>' if low_open else '>='} {low:g}"
    elif low is None:
        expected = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        if (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
                or (high is not None and (value >= high if high_open else value > high))):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = name or "float_range"
    parse.expected = expected
    _FLOAT_TYPES.add(parse)
    return parse


finite_float = float_range(name="finite_float")
positive_float = float_range(0.0, low_open=True, name="positive_float")
nonnegative_float = float_range(0.0, name="nonnegative_float")
unit_float = float_range(0.0, 1.0, name="unit_float")


def is_float_type(fn: Any) -> bool:
    """True for the validators made here (what the test over tools/*.py requires of every float flag)."""
    return fn in _FLOAT_TYPES


# -- paths ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathSpec:
    """A path and what it names: "prefix", "file", "dir", "run" (a training run or step directory) or "any"
    (an input that may be a file, a directory, a prefix or a glob). `names`: for a "dir" output, the files the
    tool writes there, literal or glob patterns (what --overwrite may replace; without `names` any entry counts);
    for a "prefix" output, the suffixes it writes."""

    path: str
    kind: str
    names: tuple[str, ...] | None = None


def prefix(path: str | os.PathLike, suffixes: Iterable[str] | None = None) -> PathSpec:
    """As an output: PATH + each of `suffixes` (default TOKEN_SUFFIXES); as an input: PATH + any PREFIX_SUFFIXES."""
    return PathSpec(os.fspath(path), "prefix", tuple(suffixes) if suffixes is not None else None)


def file(path: str | os.PathLike) -> PathSpec:
    return PathSpec(os.fspath(path), "file")


def directory(path: str | os.PathLike, names: Iterable[str] | None = None) -> PathSpec:
    return PathSpec(os.fspath(path), "dir", tuple(names) if names is not None else None)


def run_dir(path: str | os.PathLike) -> PathSpec:
    """A --checkpoint argument: a run directory (its checkpoints/, tokenizer/, config.toml and metrics.jsonl
    are inputs; other outputs may sit beside them) or one step directory, known by its meta.json (all of it
    is an input)."""
    return PathSpec(os.fspath(path), "run")


# One place a spec occupies: (as the user wrote it, real path, whole). A whole entry conflicts with anything
# inside it; a container entry (a run directory) only with itself and what contains it.
_Entry = tuple[str, str, bool]


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _entries(spec: PathSpec, output: bool = False) -> list[_Entry]:
    path = spec.path
    if spec.kind in ("file", "dir"):
        return [(path, _real(path), True)]
    if spec.kind == "prefix" and output:
        return [(path + s, _real(path + s), True) for s in spec.names or TOKEN_SUFFIXES]
    prefix_files = [(path + s, _real(path + s), True) for s in dict.fromkeys(PREFIX_SUFFIXES + (spec.names or ()))]
    if spec.kind == "prefix":
        return prefix_files
    if spec.kind == "run" and not os.path.lexists(os.path.join(path, "meta.json")):  # a run, not one step
        parts = ("checkpoints", "tokenizer", "config.toml", "metrics.jsonl")
        return [(path, _real(path), False)] + [(os.path.join(path, p), _real(os.path.join(path, p)), True)
                                               for p in parts]
    if glob.has_magic(path):
        return [e for match in sorted(glob.glob(path)) for e in _entries(PathSpec(match, "any"))]
    # "any" (and a step directory): the path itself when it exists or names no prefix, and its prefix files.
    if os.path.lexists(path) or not any(os.path.lexists(p) for p, _, _ in prefix_files):
        return [(path, _real(path), True)] + prefix_files
    return prefix_files


def _specs(value: Any) -> list[PathSpec]:
    if value is None or (isinstance(value, str) and not value):  # an unset flag
        return []
    if isinstance(value, PathSpec):
        return [value]
    if isinstance(value, (str, os.PathLike)):
        return [PathSpec(os.fspath(value), "any")]
    return [s for v in value for s in _specs(v)]


def _inside(inner: str, outer: str) -> bool:
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def _label(flag: str, path: str) -> str:
    return f"{flag} {path}" if flag else path


def overlap_refusal(outputs: Mapping[str, Any], inputs: Mapping[str, Any]) -> str | None:
    """The one-line reason why writing `outputs` would destroy one of `inputs`, or None. Both map a flag name
    (or "" in library code) to a PathSpec, a path string (an "any" input), or a list of them."""
    ins = [(flag, e) for flag, value in inputs.items() for spec in _specs(value) for e in _entries(spec)]
    for oflag, value in outputs.items():
        for spec in _specs(value):
            found = []
            for _oshown, oreal, _ in _entries(spec, output=True):
                for iflag, (ishown, ireal, iwhole) in ins:
                    if oreal == ireal:
                        what = "would overwrite the input"
                    elif _inside(ireal, oreal):
                        what = "is a directory that holds the input"
                    elif iwhole and _inside(oreal, ireal):
                        what = "would be written inside the input"
                    else:
                        continue
                    found.append((not os.path.lexists(ishown), what, iflag, ishown))
            if found:  # name a file that exists (EMB.json, not the EMB.bin no one wrote) where there is one
                _, what, iflag, ishown = min(found, key=lambda f: f[0])
                return f"{_label(oflag, spec.path)}: the output {what} {_label(iflag, ishown)}"
    return None


def existing_outputs(spec: PathSpec) -> list[str]:
    """The files of an output that exist already (for a "dir" with `names`, only the entries they name count:
    literal names or glob patterns, as megasynth.io.atomic_files owns them)."""
    if spec.kind == "dir":
        if not os.path.isdir(spec.path):  # a file where the directory should be is in the way too
            return [os.path.basename(spec.path.rstrip(os.sep))] if os.path.lexists(spec.path) else []
        return sorted(os.listdir(spec.path)) if spec.names is None else owned_names(spec.names, os.listdir(spec.path))
    return [os.path.basename(shown) for shown, _, _ in _entries(spec, output=True) if os.path.lexists(shown)]


def output_refusal(outputs: Mapping[str, Any], inputs: Mapping[str, Any], *, overwrite: bool | None = None,
                   overwrite_flag: str = "--overwrite") -> str | None:
    """overlap_refusal, then (unless `overwrite` is None: the tool checks existence itself, e.g. to resume)
    an existing output without `overwrite`."""
    refusal = overlap_refusal(outputs, inputs)
    if refusal or overwrite is None or overwrite:
        return refusal
    for flag, value in outputs.items():
        for spec in _specs(value):
            found = existing_outputs(spec)
            if found:
                return (f"{_label(flag, spec.path)}: already exists ({', '.join(found)}); pass {overwrite_flag} "
                        "to replace it")
    return None


def check_outputs(parser: argparse.ArgumentParser, outputs: Mapping[str, Any], inputs: Mapping[str, Any], *,
                  overwrite: bool | None = None) -> None:
    """output_refusal as a command-line error: one stderr line naming the flags, exit code 2, nothing written.
    Call it right after parse_args, before any work."""
    refusal = output_refusal(outputs, inputs, overwrite=overwrite)
    if refusal:
        parser.error(refusal)
