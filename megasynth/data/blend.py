"""Weighted blends of several token prefixes into one training dataset (docs/blending.md).

    sources = parse_data_path("0.3 data/books 0.7 data/web")           # or cfg.data.sources ([[data.sources]])
    ds = build_blended_dataset(sources, seq_len=2048, num_samples=100_000, seed=1234, cache_dir="cache")
    ds[i]                       # {"tokens": int64[seq_len + 1], "doc_ids": int32[seq_len + 1]}, as GPTDataset
    print(ds.sources_table(horizon_tokens=steps * global_batch * seq_len))
    ds.fingerprint              # changes when sources, weights, seq_len or seed change

The order, its bound on every prefix of samples (with the proof) and the cache: docs/blending.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megasynth.config import DataSource
from megasynth.data.gpt_dataset import GPTDataset
from megasynth.data.index_cache import cached_index, check_sample_args
from megasynth.data.indexed import IndexedDataset, sidecar_path
from megasynth.data.layout import tokenizer_hash
from megasynth.data.packed_dataset import PackedDataset
from megasynth.mixture import MixtureSource, max_epochs, render_repetition_table, repetition_rows

# Bump when the blend order or the fingerprint's content changes, so old caches and checkpoints are not mixed.
BLEND_FORMAT_VERSION = 1
# Keys per chunk while merging the sources' key sequences: bounds the working memory for any num_samples.
_CHUNK = 1 << 20
_ARRAYS = ("source_ids", "source_samples")


class BlendError(ValueError):
    """A bad blend specification or an inconsistent set of sources; the message names the offending item."""


# -- parsing --------------------------------------------------------------------------------------------------------
def parse_data_path(text: str) -> list[DataSource]:
    """Megatron's syntax: "0.3 /data/a 0.7 /data/b" (weight prefix pairs) or a single bare "/data/a" (weight 1).

    Tokens are split like a shell command line, so a quoted prefix may hold spaces.
    """
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise BlendError(f"data_path {text!r}: {e}") from None
    if not words:
        raise BlendError("data_path is empty: expected a prefix, or weight/prefix pairs like \"0.3 /a 0.7 /b\"")
    if len(words) == 1:
        if _as_number(words[0]) is not None:
            raise BlendError(f"data_path {text!r}: '{words[0]}' is a number, expected a dataset prefix after it")
        return [DataSource(path=words[0], weight=1.0, name=_default_name(words[0]))]
    sources = []
    for i in range(0, len(words), 2):
        weight_word = words[i]
        weight = _as_number(weight_word)
        if weight is None:
            raise BlendError(f"data_path token {i + 1} '{weight_word}': expected a weight (a number) before each "
                             "prefix, as in \"0.3 /data/a 0.7 /data/b\"")
        if not math.isfinite(weight) or weight < 0:
            raise BlendError(f"data_path token {i + 1} '{weight_word}': a weight must be a finite number >= 0")
        if i + 1 >= len(words):
            raise BlendError(f"data_path token {i + 1} '{weight_word}': weight without a prefix after it")
        prefix = words[i + 1]
        if _as_number(prefix) is not None:
            raise BlendError(f"data_path token {i + 2} '{prefix}': expected a dataset prefix after weight "
                             f"'{weight_word}', got a number")
        sources.append(DataSource(path=prefix, weight=weight, name=_default_name(prefix)))
    return sources


def _as_number(word: str) -> float | None:
    try:
        return float(word)
    except ValueError:
        return None


def _default_name(prefix: str) -> str:
    return os.path.basename(os.path.normpath(prefix)) or prefix


# -- the order ------------------------------------------------------------------------------------------------------
def blend_order(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(source id per sample [N] int16, sample index within that source [N] int64): the blend's first N samples.

    `weights` must be normalised (sum 1, all >= 0); zero-weight sources are never drawn. The order and the bound
    it guarantees on every prefix: docs/blending.md. Works in chunks of the key range
    [t0, t1): each chunk holds about _CHUNK samples, and each key is computed by the same expression in every
    chunk, so the half-open filter puts every sample in exactly one chunk.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not np.isfinite(w).all() or (w < 0).any() or abs(w.sum() - 1) > 1e-9:
        raise BlendError(f"blend_order: weights must be finite, >= 0 and sum to 1, got {w.tolist()}")
    active = np.flatnonzero(w > 0)
    sources, samples = [], []
    filled, t0 = 0, 0.0
    while filled < num_samples:
        t1 = t0 + max(_CHUNK, 1)
        keys, src, js = [], [], []
        for k in active:
            # Candidates j with (j + 1/2) / w in [t0, t1), with a margin of one for rounding; the filter decides.
            lo = max(0, math.floor(t0 * w[k] - 0.5) - 1)
            hi = math.ceil(t1 * w[k] - 0.5) + 1
            j = np.arange(lo, hi, dtype=np.int64)
            key = (j + 0.5) / w[k]
            keep = (key >= t0) & (key < t1)
            keys.append(key[keep])
            js.append(j[keep])
            src.append(np.full(int(keep.sum()), k, dtype=np.int16))
        key, src_c, j_c = np.concatenate(keys), np.concatenate(src), np.concatenate(js)
        order = np.lexsort((src_c, key))  # by key, ties by source index
        take = order[: num_samples - filled]
        sources.append(src_c[take])
        samples.append(j_c[take])
        filled += take.size
        t0 = t1
    return (np.concatenate(sources) if sources else np.zeros(0, np.int16),
            np.concatenate(samples) if samples else np.zeros(0, np.int64))


# -- the dataset ----------------------------------------------------------------------------------------------------
@dataclass
class BlendSource:
    """One source of a blend: its name, prefix, normalised weight, data, and the samples it gives the blend."""

    name: str
    prefix: str
    weight: float
    indexed: IndexedDataset
    num_samples: int
    dataset: GPTDataset | PackedDataset | None  # None when the blend takes no sample from it
    packing: str = "concat"  # DataSource.packing


def source_identity(indexed: IndexedDataset) -> dict:
    """What identifies a prefix's content cheaply: counts, tokenizer hash and the .idx's sha256 (not the .bin)."""
    ident = {"num_tokens": int(indexed.num_tokens), "num_documents": len(indexed),
             "tokenizer_sha256": tokenizer_hash(indexed.metadata), "idx_sha256": indexed.idx_sha256}
    if indexed.has_loss_mask:  # only when present: unmasked prefixes keep their old fingerprint
        ident["loss_mask"] = True
    return ident


def blend_fingerprint(identities: Sequence[dict], weights: Sequence[float], *, seq_len: int, seed: int,
                      packings: Sequence[str]) -> str:
    """sha256 over the sources' identities (in order), normalised weights, packing modes, seq_len and seed; no
    paths, so a moved dataset keeps its fingerprint."""
    # 12 significant digits: "0.3 a 0.7 b" and "3 a 7 b" normalise to the same blend. The packing mode enters
    # only when it is not the default, so the fingerprints of concatenated blends (and their checkpoints) stay.
    sources = [{**ident, "weight": f"{w:.12g}", **({"packing": p} if p != "concat" else {})}
               for ident, w, p in zip(identities, weights, packings)]
    payload = {"blend_format": BLEND_FORMAT_VERSION, "seq_len": int(seq_len), "seed": int(seed), "sources": sources}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(eq=False)
class BlendedDataset:
    """num_samples samples drawn from several GPTDatasets in the blend order; items as GPTDataset's."""

    sources: list[BlendSource]
    source_ids: np.ndarray
    source_samples: np.ndarray
    seq_len: int
    seed: int
    fingerprint: str
    cache_path: Path | None = None
    loaded_from_cache: bool = False

    def __post_init__(self):
        self.num_samples = int(self.source_ids.size)

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i) -> dict:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for a blend of {self.num_samples} samples")
        src = self.sources[int(self.source_ids[i])]
        return src.dataset[int(self.source_samples[i])]

    def _rows(self, horizon_tokens: float):
        return repetition_rows([MixtureSource(s.name, s.indexed.num_tokens, s.weight, s.prefix) for s in self.sources],
                               horizon_tokens)

    def sources_table(self, horizon_tokens: float, *, max_repetition: float = 8.0) -> str:
        """Per source: unique tokens, share, tokens over the horizon, epochs, and a warning above max_repetition."""
        return render_repetition_table(self._rows(horizon_tokens), horizon_tokens, max_repetition=max_repetition,
                                       title=f"blend {self.fingerprint[:12]}")

    def packing_summaries(self) -> list[str]:
        """One line per packed source: windows, packing efficiency (share of real tokens), truncated examples."""
        return [s.dataset.summary() for s in self.sources if isinstance(s.dataset, PackedDataset)]

    def max_repetition(self, horizon_tokens: float) -> float:
        """The largest number of epochs any source is read over the horizon."""
        return max_epochs(self._rows(horizon_tokens))

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.name} {s.weight:.3f}" for s in self.sources)
        return f"BlendedDataset({self.num_samples} x {self.seq_len + 1} tokens: {parts}; {self.fingerprint[:12]})"


def _check_sources(sources: Sequence) -> list[tuple[str, str, float]]:
    """(name, prefix, raw weight) per source; errors name the source (the packing mode: _packing)."""
    if not sources:
        raise BlendError("a blend needs at least one source (data.sources or data.data_path)")
    out, seen = [], {}
    for i, s in enumerate(sources):
        path, weight, name = getattr(s, "path", None), getattr(s, "weight", None), getattr(s, "name", "")
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise BlendError(f"source {i}: path must be a non-empty dataset prefix, got {path!r}")
        path = os.fspath(path)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise BlendError(f"source {i} ({path}): weight must be a finite number >= 0, got {weight!r}")
        key = os.path.realpath(path)
        if key in seen:
            raise BlendError(f"source {i} ({path}): the same prefix as source {seen[key]}; give it one entry "
                             "with the summed weight (two entries would read the same samples twice)")
        seen[key] = i
        out.append((name or _default_name(path), path, float(weight)))
    if sum(w for _, _, w in out) <= 0:
        raise BlendError("every source weight is 0: at least one source needs a positive weight")
    return out


PACKING_MODES = ("concat", "pack")


def _packing(source, i: int) -> str:
    mode = getattr(source, "packing", "concat") or "concat"
    if mode not in PACKING_MODES:
        raise BlendError(f"source {i} ({getattr(source, 'path', '')}): packing must be one of {list(PACKING_MODES)}, "
                         f"got {mode!r}")
    return mode


def build_source_dataset(indexed: IndexedDataset, packing: str, *, seq_len: int, num_samples: int, seed: int,
                         cache_dir, name: str = "") -> GPTDataset | PackedDataset:
    """The sample dataset of one prefix: concatenated windows (GPTDataset) or packed examples (PackedDataset)."""
    cls = PackedDataset if packing == "pack" else GPTDataset
    return cls(indexed, seq_len=seq_len, num_samples=num_samples, seed=seed, cache_dir=cache_dir, name=name)


def _check_tokenizers(indexed: list[IndexedDataset]) -> None:
    """Sources must share one tokenizer (sidecar hash) and vocab size wherever their sidecars record them."""
    for key, value_of in (("tokenizer sha256", lambda ds: tokenizer_hash(ds.metadata)),
                          ("vocab_size", lambda ds: (ds.metadata or {}).get("vocab_size"))):
        first = None
        for ds in indexed:
            v = value_of(ds)
            if v is None:
                continue
            if first is None:
                first = (ds, v)
            elif v != first[1]:
                raise BlendError(f"{sidecar_path(ds.prefix)}: {key} {v!r} differs from "
                                 f"{sidecar_path(first[0].prefix)}'s "
                                 f"{first[1]!r}: sources {first[0].prefix} and {ds.prefix} use different tokenizers")


def build_blended_dataset(sources: Sequence[DataSource], *, seq_len: int, num_samples: int, seed: int,
                          cache_dir: str | os.PathLike | None) -> BlendedDataset:
    """The blend of `sources` (objects with .path, .weight and optionally .name); one source is a blend of one."""
    check_sample_args("build_blended_dataset", seq_len, num_samples, seed, BlendError)
    checked = _check_sources(sources)
    packings = [_packing(s, i) for i, s in enumerate(sources)]
    weights = [w / math.fsum(w for _, _, w in checked) for _, _, w in checked]
    if len(checked) > np.iinfo(np.int16).max:
        raise BlendError(f"a blend holds at most {np.iinfo(np.int16).max} sources, got {len(checked)}")
    indexed = [IndexedDataset(prefix) for _, prefix, _ in checked]
    _check_tokenizers(indexed)
    fingerprint = blend_fingerprint([source_identity(ds) for ds in indexed], weights, seq_len=seq_len, seed=seed,
                                    packings=packings)

    cache_path = Path(cache_dir) / f"blend_{fingerprint}_{num_samples}.npz" if cache_dir is not None else None
    index, loaded = cached_index(
        cache_path, _ARRAYS, "blend-index",
        lambda ix: (ix["source_ids"].shape == ix["source_samples"].shape == (num_samples,)
                    and not (ix["source_ids"].size and ix["source_ids"].max() >= len(checked))),
        lambda: dict(zip(_ARRAYS, blend_order(weights, num_samples))),
        lambda: json.dumps({"fingerprint": fingerprint, "num_samples": num_samples, "seq_len": seq_len, "seed": seed,
                            "sources": [[n, p, w] for (n, p, _), w in zip(checked, weights)]}),
        mismatch="the wrong shape")
    ids, samples = index["source_ids"], index["source_samples"]

    counts = np.bincount(ids, minlength=len(checked))
    blend_sources = []
    for (name, prefix, _), w, ds, n, packing in zip(checked, weights, indexed, counts, packings):
        # Each source's dataset holds exactly the samples the blend reads from it, with the run's seed, so a
        # blend of one source reads the same samples in the same order as a plain GPTDataset / PackedDataset.
        sub = (build_source_dataset(ds, packing, seq_len=seq_len, num_samples=int(n), seed=seed, cache_dir=cache_dir,
                                    name=name) if n > 0 else None)
        blend_sources.append(BlendSource(name, prefix, w, ds, int(n), sub, packing))
    return BlendedDataset(blend_sources, ids, samples, seq_len=seq_len, seed=seed, fingerprint=fingerprint,
                          cache_path=cache_path, loaded_from_cache=loaded)
