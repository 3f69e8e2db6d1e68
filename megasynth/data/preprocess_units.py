"""preprocess_data as independent workers (megasynth.work_units): units are runs of whole input files, each worker
tokenizes its units into part prefixes in the work directory, and publish merges them into one prefix whose bytes
(sidecar included) are those of a single-process run, whatever the number of workers.

    summary = preprocess_units(inputs, "data/web", "tok/", work_dir="data/web.work", worker=Worker(1, 8))
    summary = preprocess_units(..., publish="only")      # every unit there? then assemble; else name the missing

Units: the input files in the order a single run reads them, cut into runs of at most `unit_bytes` bytes on disk
(a larger file is a unit of its own). They are known from the file list and sizes alone, so every worker agrees.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from types import SimpleNamespace
from pathlib import Path
from typing import Sequence

from megasynth.data.indexed import (IndexedDataset, IndexedDatasetWriter, check_not_empty,
                                    smallest_token_dtype)
from megasynth.data.merge import append_dataset
from megasynth.data.preprocess import (check_output_prefix, open_run, prefix_metadata, preprocess, read_stats,
    remove_created_dirs)
from megasynth.data.readers import InputReader, ReaderOptions
from megasynth.work_units import Worker, WorkUnits, make_then_check, publishing

DEFAULT_UNIT_BYTES = 1 << 30
PART = "part"  # the part prefix inside a unit directory


def plan_units(sizes: Sequence[int], unit_bytes: int) -> list[list[int]]:
    """Runs of consecutive file indices, each at most unit_bytes in all (or one larger file)."""
    units: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if not units or total + size > unit_bytes:
            units.append([])
            total = 0
        units[-1].append(i)
        total += size
    return units or [[]]


def preprocess_units(inputs: Sequence[str | os.PathLike], output_prefix: str | os.PathLike,
                     tokenizer_path: str | os.PathLike, *, work_dir: str | os.PathLike, worker: Worker,
                     options: ReaderOptions | None = None, add_bos: bool = False, append_eod: bool = True,
                     workers: int = 1, unit_bytes: int = DEFAULT_UNIT_BYTES, publish: str = "auto",
                     overwrite: bool = False, allow_empty: bool = False, log=None) -> dict:
    """Do this worker's units, then publish when every unit is done (`publish`: "auto"; "never": only the units;
    "only": no units, publish or refuse with the missing ones). Returns {"made": [...], "published": bool, ...}
    plus the output's summary when this call published it."""
    if unit_bytes < 1:
        raise ValueError(f"--unit-bytes must be >= 1, got {unit_bytes}")
    started = time.perf_counter()
    options = options or ReaderOptions()
    output_prefix = os.fspath(output_prefix)
    # The output's place is checked here, its existence when publishing.
    reader, _, tokenizer = open_run(inputs, output_prefix, tokenizer_path, options, add_bos=add_bos, overwrite=True)
    files = [str(f.path.resolve()) for f in reader.files]
    groups = plan_units([f.size for f in reader.files], unit_bytes)
    settings = {"files": [[p, f.size] for p, f in zip(files, reader.files)], "options": asdict(options),
                "tokenizer_sha256": tokenizer.identity()["sha256"], "add_bos": add_bos, "append_eod": append_eod,
                "unit_bytes": unit_bytes}
    units = WorkUnits(work_dir, stage="preprocess_data", settings=settings, num_units=len(groups),
                      create=publish != "only")
    out: dict = {"units": units.num_units, "made": [], "published": False}
    done = units.published(f"{output_prefix}.idx")
    if done is not None and not (publish == "only" and overwrite):
        return {**out, **done["summary"], "already_published": True}

    def make_unit(k: int, tmp: Path) -> dict:
        s = preprocess([files[i] for i in groups[k]], tmp / PART, tokenizer_path, options=options, add_bos=add_bos,
                       append_eod=append_eod, workers=workers, progress=False, allow_empty=True)
        return {key: s[key] for key in ("documents", "tokens", "skipped_empty", "skipped_bad", "bad_examples")}

    if not make_then_check(units, worker, make_unit, publish, out, log=log):
        return out
    with publishing(units, output_prefix, f"{output_prefix}.idx", tool="a preprocess_data publisher",
                    flag="--output-prefix", publish=publish) as turn:
        if turn != "publish":  # another worker is publishing, or published while we looked
            return out if turn == "busy" else {**out, **units.published()["summary"], "already_published": True}
        out.update(_publish(units, output_prefix, tokenizer, add_bos=add_bos, append_eod=append_eod, options=options,
                            reader=reader, overwrite=overwrite, allow_empty=allow_empty))
        units.mark_published(output_prefix, {k: v for k, v in out.items() if k not in ("made", "busy", "units")})
    out["published"], out["seconds"] = True, time.perf_counter() - started
    return out


def _publish(units: WorkUnits, output_prefix: str, tokenizer, *, add_bos: bool, append_eod: bool,
             options: ReaderOptions, reader: InputReader, overwrite: bool, allow_empty: bool) -> dict:
    """Every unit's part, in unit order, into the output: the sidecar a single-process run writes."""
    records = [units.record(k) for k in range(units.num_units)]  # checks settings, sizes and sha256 first
    parts = [IndexedDataset(units.unit_dir(k) / PART) for k in range(units.num_units)]
    missing_dirs = check_output_prefix(output_prefix, reader, overwrite=overwrite)  # check_output_free too

    # The counts a single run's reader would have, summed over the units.
    stats = SimpleNamespace(**{key: sum(r["counts"][key] for r in records)
                               for key in ("documents", "skipped_empty", "skipped_bad")})
    tokens = sum(r["counts"]["tokens"] for r in records)
    check_not_empty(output_prefix, stats.documents, allow_empty=allow_empty)
    sources = [s for part in parts for s in (part.metadata or {}).get("sources", [])]
    try:
        Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
        with IndexedDatasetWriter(output_prefix, smallest_token_dtype(tokenizer.vocab_size),
                                  metadata=prefix_metadata(tokenizer, add_bos=add_bos, append_eod=append_eod)) as w:
            for part in parts:
                append_dataset(w, part)
            w.finalize(metadata={"sources": sources, "stats": read_stats(stats, tokens)})
    except BaseException:
        remove_created_dirs(missing_dirs)
        raise
    output_bytes = sum(Path(f"{output_prefix}{suffix}").stat().st_size for suffix in (".bin", ".idx", ".json"))
    bad = [m for r in records for m in r["counts"]["bad_examples"]][:options.max_bad_shown]
    return {**read_stats(stats, tokens), "bad_examples": bad, "input_bytes": reader.total_bytes,
            "output_bytes": output_bytes}
