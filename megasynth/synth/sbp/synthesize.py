"""SBP stage 5: sample synthetic documents from a tuned synthesizer, prompted with random seed documents of a corpus.

    summary = synthesize("runs/synthesizer", "data/real", "data/synthetic", SynthSettings(num_docs=10_000))

Seeds, determinism, shards, resumption, torchrun and the output: docs/sbp.md, "How each stage works"."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from megasynth.chat import PAIR_SEPARATOR
from megasynth.checkpoint import resolve_checkpoint, verify_checkpoint
from megasynth.cli import prefix as prefix_spec
from megasynth.config import load_config
from megasynth.data.indexed import IndexedDataset, smallest_token_dtype
from megasynth.data.prefix import check_output_prefix, idx_path, sidecar_path
from megasynth.distributed import is_distributed, on_rank0, rank_and_world
from megasynth.faults import fault_point
from megasynth.generate import find_tokenizer_dir, load_model_and_tokenizer
from megasynth.io import file_sha256, remove_dir
from megasynth.run_lock import RunDirBusy, acquire_path_lock
from megasynth.synth.corpus import check_tokenizer, document_bodies, pair_separator_id
from megasynth.synth.llm.settings import LLMSettings
from megasynth.synth.sbp.samplers import EndpointSampler, LocalSampler, Sampled, Sampling
from megasynth.synth.sbp.shards import FAULT_ENV, Shard, ShardStore
from megasynth.synth.sbp.vllm_sampler import VLLMSampler, VLLMSettings, backend_record, export_for_vllm
from megasynth.synth.synthetic_prefix import write_synthetic_prefix
from megasynth.synth.workdir import WorkDir, WorkDirMismatch
from megasynth.tokenizer import load_tokenizer

_SEED_STREAM = 0x53425053  # "SBPS": the stream of seed draws, apart from every sampling stream
_ZERO_ROUNDS = 4  # rounds in a row that yield no token before a tokens=T run gives up
TOOL = "tools/synthesize.py"  # named in the refusals of a second run (megasynth.run_lock)


class SynthError(ValueError):
    """Bad settings or inputs for synthesis; one line naming the file or flag."""


@dataclass
class SynthSettings:
    num_docs: int | None = None
    """Samples to draw (the output holds this many minus the empty outputs); or give tokens."""
    tokens: int | None = None
    """Draw whole shards until the output holds at least this many tokens (EOD included); or give num_docs."""
    seed: int = 0
    """Seeds the seed-document draws and every sample's random stream."""
    temperature: float = 1.0
    """Softmax temperature (1: the paper's choice; 0: greedy)."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1] (1: off)."""
    max_seed_tokens: int | None = None
    """Tokens of the seed document in the prompt (default: (max_seq_len - 1) // 2, or what max_new_tokens leaves)."""
    max_new_tokens: int | None = None
    """Most tokens sampled per document (default: what the prompt leaves of the model's max_seq_len)."""
    shard_docs: int = 256
    """Samples per shard: the unit of work written to the work directory (and shared out over ranks)."""
    batch_size: int = 16
    """Prompts per generate() batch (our sampler); does not change the output."""

    def check(self) -> None:
        if (self.num_docs is None) == (self.tokens is None):
            raise SynthError("give exactly one of --num-docs and --tokens")
        for name in ("num_docs", "tokens", "max_seed_tokens", "max_new_tokens", "shard_docs", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SynthError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise SynthError(f"need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1; got {self.temperature}, "
                             f"{self.top_k}, {self.top_p}")


# -- seeds and prompts -------------------------------------------------------------------------------------------------
def shard_seed_documents(seed: int, shard: int, shard_docs: int, candidates: np.ndarray) -> np.ndarray:
    """The seed documents of the shard's samples: uniform draws from `candidates`, a function of (seed, shard)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, _SEED_STREAM, shard]))
    return candidates[rng.integers(0, candidates.size, shard_docs)]


def prompt_lengths(max_seq_len: int, max_seed: int | None, max_new: int | None) -> tuple[int, int]:
    """(max_seed_tokens, max_new_tokens) with the defaults filled in; prompt (+ <|sep|>) + new must fit max_seq_len."""
    if max_seed is None and max_new is None:
        max_seed = (max_seq_len - 1) // 2
    if max_seed is None:
        max_seed = max_seq_len - 1 - max_new
    if max_new is None:
        max_new = max_seq_len - 1 - max_seed
    if max_seed < 1 or max_new < 1 or max_seed + 1 + max_new > max_seq_len:
        raise SynthError(f"--max-seed-tokens {max_seed} + 1 (<|sep|>) + --max-new-tokens {max_new} must fit the "
                         f"model's max_seq_len {max_seq_len}, with both >= 1")
    return max_seed, max_new


# -- the synthesizer ---------------------------------------------------------------------------------------------------
@dataclass
class Synthesizer:
    """A checkpoint's identity, config, tokenizer and (local backend) model."""

    step_dir: Path
    meta_sha256: str
    max_seq_len: int
    tokenizer: object
    model: object | None
    data_paths: tuple[str, ...] = ()  # the prefixes it was tuned on (its config's data sources), for their sidecars


def load_synthesizer(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None, *, load_weights: bool,
                     device="cpu", dtype=torch.float32) -> Synthesizer:
    if load_weights:
        model, cfg, tok, step_dir = load_model_and_tokenizer(checkpoint, tokenizer, device, dtype)
    else:  # an endpoint serves the weights; the checkpoint gives the tokenizer, the limits and its identity
        step_dir = verify_checkpoint(resolve_checkpoint(checkpoint))
        cfg, model = load_config(step_dir / "config.toml"), None
        tok_dir = Path(tokenizer) if tokenizer else find_tokenizer_dir(checkpoint, step_dir)
        if tok_dir is None:
            raise FileNotFoundError(f"{checkpoint}: no tokenizer/ directory in the checkpoint or its run directory; "
                                    "pass --tokenizer DIR")
        tok = load_tokenizer(tok_dir)
    try:
        from megasynth.data.loader import data_sources  # noqa: PLC0415

        data_paths = tuple(str(source.path) for source in data_sources(cfg.data))
    except (ValueError, AttributeError):
        data_paths = ()
    return Synthesizer(step_dir, file_sha256(step_dir / "meta.json"), cfg.model.max_seq_len, tok, model, data_paths)


def recorded_separator(synth: Synthesizer) -> tuple[str, int, str] | None:
    """(text, id, sidecar) of the pair separator the synthesizer was tuned on: sft.pair_separator in the sidecar of
    a prefix its checkpoint's config trained on (tools/make_pair_dataset.py, preprocess_sft.py --format pair
    write it); None when no readable sidecar records one. Two different ones are an error."""
    found: dict[tuple[str, int], str] = {}
    for prefix in synth.data_paths:
        try:
            meta = json.loads(sidecar_path(prefix).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        sep = ((meta.get("sft") or {}) if isinstance(meta, dict) else {}).get("pair_separator")
        if isinstance(sep, dict) and isinstance(sep.get("text"), str) and isinstance(sep.get("id"), int):
            found.setdefault((sep["text"], sep["id"]), str(sidecar_path(prefix)))
    if len(found) > 1:
        raise SynthError(f"{synth.step_dir}: the synthesizer was tuned on pair data with different separators ("
                         + ", ".join(f"{where}: {t!r} id {i}" for (t, i), where in found.items()) + ")")
    return next(((t, i, where) for (t, i), where in found.items()), None)


def resolve_separator(synth: Synthesizer, separator: str | None) -> tuple[str, int]:
    """(text, id) of the separator to prompt with: the one the synthesizer was tuned on (recorded_separator), else
    `separator`, else <|sep|>. An explicit separator that differs from the recorded one is refused, and so is a
    recorded one whose id is not what the synthesizer's tokenizer gives it (another tokenizer)."""
    recorded = recorded_separator(synth)
    if recorded is not None and separator is not None and separator != recorded[0]:
        raise SynthError(f"--separator {separator!r} is not the separator the synthesizer was tuned on: "
                         f"{recorded[2]} records {recorded[0]!r} (id {recorded[1]}); drop --separator or pass that one")
    text = separator or (recorded[0] if recorded is not None else PAIR_SEPARATOR)
    sep_id = pair_separator_id(synth.tokenizer, text)
    if recorded is not None and recorded[1] != sep_id:
        raise SynthError(f"{recorded[2]}: records the separator {text!r} as id {recorded[1]}, but the synthesizer's "
                         f"tokenizer {synth.tokenizer.path} gives it id {sep_id}")
    return text, sep_id


# -- the run -----------------------------------------------------------------------------------------------------------
def _dist():
    """(torch.distributed or None when not distributed, rank, world size). A process group of one is not
    distributed: the vLLM backend's engine sets one up in this process while it runs."""
    rank, world = rank_and_world()
    return (torch.distributed if is_distributed() and world > 1 else None), rank, world


class _Run:
    """One synthesis run on this rank."""

    def __init__(self, corpus: IndexedDataset, synth: Synthesizer, settings: SynthSettings, sampler, sep_id: int,
                 store: ShardStore, progress: bool):
        self.corpus, self.settings, self.sampler = corpus, settings, sampler
        self.sep_id, self.store = sep_id, store
        self.eod_id = synth.tokenizer.eod_id
        self.vocab = synth.tokenizer.vocab_size
        self.starts, self.bodies = document_bodies(corpus, self.eod_id)
        self.candidates = np.flatnonzero(self.bodies > 0)
        if self.candidates.size == 0:
            raise SynthError(f"{corpus.prefix}: no document holds a token besides its EOD: nothing to prompt with")
        self.dist, self.rank, self.world = _dist()
        self.bar = None
        if progress and self.rank == 0:
            from tqdm import tqdm  # noqa: PLC0415

            self.bar = tqdm(unit="doc", desc=f"synthesize (rank 0 of {self.world})", file=sys.stderr,
                            dynamic_ncols=True, total=settings.num_docs)
        self.t0, self.produced = time.perf_counter(), 0

    def shard(self, k: int) -> Shard:
        """Shard k from the work directory, or sampled now and written there."""
        if self.store.has(k):
            return self.store.read(k)
        shard = self.sample(k)
        self.store.write(k, shard)
        if self.bar is not None:
            self.produced += shard.num_tokens
            self.bar.update(shard.requested * self.world)
            self.bar.set_postfix_str(f"{self.produced / max(time.perf_counter() - self.t0, 1e-9):,.0f} tok/s "
                                     "(rank 0)", refresh=False)
        return shard

    def sample(self, k: int) -> Shard:
        """Shard k, sampled now: a function of the settings and k alone."""
        d, num_docs = self.settings.shard_docs, self.settings.num_docs
        samples = np.arange(k * d, (k + 1) * d if num_docs is None else min((k + 1) * d, num_docs), dtype=np.int64)
        seeds = shard_seed_documents(self.settings.seed, k, d, self.candidates)[:samples.size]
        lengths = np.minimum(self.bodies[seeds], self.settings.max_seed_tokens)
        prompts = [np.append(self.corpus.tokens[s:s + n], self.sep_id).astype(np.int64)
                   for s, n in zip(self.starts[seeds], lengths)]
        return self._finish(self.sampler(prompts, samples), samples, seeds)

    def _finish(self, sampled: list[Sampled], samples: np.ndarray, seeds: np.ndarray) -> Shard:
        docs, keep, empty, truncated, oov = [], [], 0, 0, 0
        for j, (ids, ended) in enumerate(sampled):
            if not ids:
                empty += 1
            elif max(ids) >= self.vocab or min(ids) < 0:
                oov += 1  # an id the tokenizer lacks (a model row past its vocabulary): not a document
            else:
                docs.append(np.append(np.asarray(ids, np.int64), self.eod_id))
                keep.append(j)
                truncated += not ended
        lengths = np.fromiter(map(len, docs), np.int64, len(docs))
        dtype = smallest_token_dtype(self.vocab)
        tokens = np.concatenate(docs).astype(dtype) if docs else np.empty(0, dtype)
        keep = np.asarray(keep, np.int64)
        return Shard(tokens, lengths, samples[keep], seeds[keep].astype(np.int64), len(sampled), empty, truncated, oov)

    def run(self) -> int:
        """Make this rank's shards; return the number of shards of the output."""
        s = self.settings
        if s.num_docs is not None:
            n = -(-s.num_docs // s.shard_docs)
            for k in range(self.rank, n, self.world):
                self.shard(k)
            return n
        total, zero_rounds, r = 0, 0, 0
        while True:
            mine = self.shard(r * self.world + self.rank).num_tokens
            counts = [mine] if self.dist is None else self._gather(mine)
            for j, c in enumerate(counts):
                total += c
                if total >= s.tokens:
                    return r * self.world + j + 1
            zero_rounds = zero_rounds + 1 if sum(counts) == 0 else 0
            if zero_rounds >= _ZERO_ROUNDS:
                raise SynthError(f"shards {(r + 1 - zero_rounds) * self.world}..{(r + 1) * self.world - 1} produced "
                                 "no token (every output empty): is the checkpoint a tuned synthesizer?")
            r += 1

    def _gather(self, value: int) -> list[int]:
        out: list = [None] * self.world
        self.dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if isinstance(self.sampler, VLLMSampler):
            self.sampler.close()


def _backend_record(endpoint: LLMSettings | None, vllm: VLLMSettings | None, prompt_format: str,
                    dtype: torch.dtype) -> dict:
    """What of the backend decides the samples. An endpoint's URL does not (a rerun against another server, or a
    fleet, of the same served model resumes): its served model and prompt format do."""
    if endpoint is not None:
        return {"kind": "endpoint", "served_model": endpoint.model, "prompt_format": prompt_format}
    if vllm is not None:
        return backend_record(vllm, dtype)
    return {"kind": "local", "dtype": str(dtype).removeprefix("torch.")}


def _settings_record(corpus: IndexedDataset, synth: Synthesizer, settings: SynthSettings, sep_id: int,
                     backend: dict, separator: str) -> dict:
    """Everything that decides the output: the work directory's manifest and the sidecar's "synthesis" entry."""
    record = {
        "checkpoint": {"path": os.path.abspath(synth.step_dir), "meta_sha256": synth.meta_sha256},
        "corpus": {"prefix": os.path.abspath(corpus.prefix), "idx_sha256": corpus.idx_sha256,
                   "num_documents": len(corpus)},
        "tokenizer_sha256": synth.tokenizer.identity()["sha256"], "separator": separator, "separator_id": sep_id,
        "backend": backend,
        **{k: v for k, v in asdict(settings).items() if k != "batch_size"},
    }
    return json.loads(json.dumps(record))


def prepare(checkpoint, corpus_prefix, settings: SynthSettings, *, tokenizer, device, dtype, endpoint, vllm,
            prompt_format: str, separator, load_weights: bool = True):
    """(corpus, synthesizer, settings with the lengths filled in, separator id, settings record) of a run, every
    input checked; the synthesizer's weights are loaded for our own sampler only (and only with load_weights)."""
    settings.check()
    if vllm is not None:
        vllm.check()
    backend = _backend_record(endpoint, vllm, prompt_format, dtype)  # VLLMError now when vLLM is missing
    corpus = IndexedDataset(corpus_prefix)
    synth = load_synthesizer(checkpoint, tokenizer, load_weights=load_weights and backend["kind"] == "local",
                             device=device, dtype=dtype)
    check_tokenizer(corpus, synth.tokenizer, role="the synthesizer's tokenizer")
    separator, sep_id = resolve_separator(synth, separator)
    max_seed, max_new = prompt_lengths(synth.max_seq_len, settings.max_seed_tokens, settings.max_new_tokens)
    settings = replace(settings, max_seed_tokens=max_seed, max_new_tokens=max_new)
    return corpus, synth, settings, sep_id, _settings_record(corpus, synth, settings, sep_id, backend, separator)


def make_sampler(synth: Synthesizer, settings: SynthSettings, *, endpoint, vllm, prompt_format: str, dtype,
                 work_path: Path, ledger: Path):
    """The backend's sampler (a _Run closes it when it is a VLLMSampler); a vLLM export goes to work_path."""
    sampling = Sampling(settings.seed, settings.temperature, settings.top_k, settings.top_p, settings.max_new_tokens)
    if endpoint is not None:
        return EndpointSampler(endpoint, synth.tokenizer, sampling, ledger, prompt_format)
    if vllm is not None:
        def export() -> Path:  # at the first shard to sample
            return export_for_vllm(synth.step_dir, synth.meta_sha256, synth.tokenizer, work_path, dtype)

        return VLLMSampler(export, synth.tokenizer.eod_id, sampling, vllm, dtype=dtype,
                           max_model_len=synth.max_seq_len)
    return LocalSampler(synth.model, synth.tokenizer.eod_id, sampling, settings.batch_size)


def _own_output(output_prefix: str, record: dict) -> dict | None:
    """The sidecar at OUT when this very run (the same settings) wrote it: a run killed while or after publishing."""
    try:
        meta = json.loads(sidecar_path(output_prefix).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    synthesis = meta.get("synthesis") if isinstance(meta, dict) else None
    return meta if isinstance(synthesis, dict) and synthesis.get("settings") == record else None


def synthesize(checkpoint: str | os.PathLike, corpus_prefix: str | os.PathLike, output_prefix: str | os.PathLike,
               settings: SynthSettings, *, tokenizer: str | os.PathLike | None = None,
               work_dir: str | os.PathLike | None = None, overwrite: bool = False, keep_work: bool = False,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               endpoint: LLMSettings | None = None, prompt_format: str = "ids", progress: bool = True,
               separator: str | None = None, vllm: VLLMSettings | None = None) -> dict:
    """Run synthesis (docs/sbp.md); on rank 0 return the output's counts, on other ranks {"rank": r}.
    `separator`: see resolve_separator (default: the one recorded by the pair data it was tuned on, else <|sep|>).
    `endpoint`: sample through this OpenAI-compatible server instead of locally, sending each prompt as token ids
    or, with prompt_format="text", as text. `vllm`: sample with a vLLM engine in this process (in `dtype`; one
    process, not under torchrun). Raises SynthError, VLLMError, IndexedDatasetError, TokenizerError,
    CheckpointError, WorkDirMismatch, RunDirBusy or OutputExistsError on bad input, before any sampling."""
    dist, rank, _ = _dist()
    if vllm is not None and (endpoint is not None or dist is not None):
        raise SynthError("--backend vllm runs one engine in one process: not with an endpoint, and not under "
                         "torchrun (vLLM sets up its own process group); use --vllm-tensor-parallel-size for a "
                         "model larger than one GPU, or one run per GPU with its own --seed and --output-prefix")
    corpus_prefix, output_prefix = os.fspath(corpus_prefix), os.fspath(output_prefix)
    work_path = Path(work_dir) if work_dir is not None else Path(f"{output_prefix}.work")
    lock = on_rank0(lambda: acquire_path_lock(output_prefix, tool=TOOL, flag="--output-prefix"), main=rank == 0,
                    distributed=dist is not None, error_type=SynthError, catch=(WorkDirMismatch, RunDirBusy, OSError))
    wd = None
    try:
        corpus, synth, settings, sep_id, record = prepare(
            checkpoint, corpus_prefix, settings, tokenizer=tokenizer, device=device, dtype=dtype, endpoint=endpoint,
            vllm=vllm, prompt_format=prompt_format, separator=separator)
        own = _own_output(output_prefix, record) if work_path.is_dir() else None
        if dist is not None:
            dist.barrier()  # every rank has looked at OUT and the work directory before rank 0 changes either
        if own is not None and idx_path(output_prefix).is_file() and not overwrite:
            if rank == 0:  # killed after publishing, before the work directory was removed: finish the cleanup
                with WorkDir.open(work_path, pipeline="synthesize", settings=record):
                    if not keep_work:
                        remove_dir(work_path)  # still locked (so present): no run that starts now can be inside it
            return {**own["synthesis"]["counts"], "already_complete": True}
        # Killed while publishing (its .bin/.json in place, no .idx yet): the files are this run's to replace. A
        # provenance table without its prefix (killed before publishing) is replaced in any case.
        overwrite = overwrite or own is not None
        check_output_prefix(output_prefix, {"--corpus": prefix_spec(corpus_prefix)}, overwrite=overwrite,
                            error=SynthError)
        # Rank 0 locks the work directory and writes or checks its manifest; the others check it after that.
        wd = on_rank0(lambda: WorkDir.open(work_path, pipeline="synthesize", settings=record), main=rank == 0,
                      distributed=dist is not None, error_type=SynthError, catch=(WorkDirMismatch, RunDirBusy, OSError))
        if rank != 0:
            WorkDir.check(work_path, pipeline="synthesize", settings=record)
        sampler = make_sampler(synth, settings, endpoint=endpoint, vllm=vllm, prompt_format=prompt_format,
                               dtype=dtype, work_path=work_path, ledger=work_path / f"ledger.rank{rank}.jsonl")
        with closing(_Run(corpus, synth, settings, sampler, sep_id, ShardStore(work_path), progress)) as run:
            num_shards = run.run()
        if dist is not None:
            dist.barrier()  # every shard is on disk
        if rank != 0:
            return {"rank": rank}
        # Still free (checked again by the writer)? No other synthesize run can have written it (the prefix lock),
        # another tool can have.
        counts = publish_shards(output_prefix, ShardStore(work_path).read, num_shards, synth.tokenizer, record,
                                endpoint, overwrite)
        if not keep_work:
            remove_dir(work_path)  # still locked (so present): no run that starts now can be inside it
        return counts
    finally:
        if wd is not None:
            wd.close()
        if lock is not None:
            lock.release(remove=True)


def publish_shards(output_prefix: str, read_shard, num_shards: int, tok, record: dict, endpoint: LLMSettings | None,
                   overwrite: bool) -> dict:
    """Shards read_shard(0..num_shards-1) in order -> OUT.provenance.parquet, then the prefix (its .idx last)."""
    served_by = {} if endpoint is None else {"served_by": endpoint.base_url}  # informative: not a setting
    counts = {"requested": 0, "generated": 0, "empty_dropped": 0, "truncated": 0, "out_of_vocab_dropped": 0,
              "tokens": 0, "shards": num_shards}

    def shards():
        for k in range(num_shards):
            shard = read_shard(k)
            counts["requested"] += shard.requested
            counts["generated"] += int(shard.lengths.size)
            counts["empty_dropped"] += shard.empty
            counts["truncated"] += shard.truncated
            counts["out_of_vocab_dropped"] += shard.out_of_vocab
            counts["tokens"] += shard.num_tokens
            yield shard.tokens, shard.lengths, {"seed": shard.seeds, "sample": shard.samples}

    def synthesis() -> dict:  # called once the table is published, before the prefix is
        fault_point(FAULT_ENV, "provenance")
        if counts["generated"] == 0:
            raise SynthError(f"{output_prefix}: all {counts['requested']:,} samples were empty or dropped "
                             f"({counts['empty_dropped']:,} empty): no document to write")
        return {"synthesis": {"settings": record, **served_by, "counts": counts}}

    write_synthetic_prefix(output_prefix, tok, (), columns={"seed": pa.int64(), "sample": pa.int64()},
                           generator="synthesize", late_metadata=synthesis, overwrite=overwrite, allow_empty=True,
                           tokenized=shards())
    return counts
