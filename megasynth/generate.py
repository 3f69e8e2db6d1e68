"""Batched sampling with a KV cache: prompts of token ids in, continuations out (front end: tools/generate.py).

    from megasynth.generate import generate
    outs = generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=64, temperature=0.8, top_p=0.95, eod_id=0, seed=1)

Batch layout, seeded sampling and the decoding modes: docs/training.md ("Generation").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from megasynth.config import ModelConfig
from megasynth.model import Transformer, resolved_dims

DecodeMode = Literal["dynamic", "static", "cuda_graph"]


class KVCache:
    """Every layer's keys and values, preallocated [B, Hkv, max_len, D]; implements model.KVCacheLike.

        cache = KVCache(model.cfg, batch_size=B, max_len=P + N - 1, device=dev, dtype=torch.float32)
        positions = cache.reserve(P, left_pad=pad)      # prefill: slots [0, P), row b's prompt starts at pad[b]
        h = model.hidden_states(ids, positions=positions, kv_cache=cache)
        positions = cache.reserve(1)                    # then one slot per decoding step

    Every row shares the write slot (prompts are right-aligned); `start[b]` is row b's first real slot.
    """

    def __init__(self, model_cfg: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
        n_kv, head_dim, _ = resolved_dims(model_cfg)
        shape = (batch_size, n_kv, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(model_cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(model_cfg.n_layers)]
        self.max_len = max_len
        self.device = self.keys[0].device
        self.start = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.length = 0  # slots filled (or reserved for the forward in flight); the same for every row
        self._write = 0  # first slot of the chunk in flight
        self._mask: torch.Tensor | None = None
        # Static mode (fixed shapes for CUDA graphs): the write slot lives on the device.
        self.static = False
        self._slot: torch.Tensor | None = None
        self._static_mask: torch.Tensor | None = None
        self._static_positions: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    # --------------------------------------------------------------------------------------- dynamic mode

    def reserve(self, num_new: int, left_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Claim the next `num_new` slots for one forward; build its mask; return positions [B, num_new].

        `left_pad` [B] (first call only): padding slots before each row's first real token.
        """
        if self.static:
            raise RuntimeError("KVCache.reserve() after begin_static(): use static_step()")
        if left_pad is not None:
            if self.length:
                raise RuntimeError("left_pad is only accepted by the first reserve() (the prefill)")
            self.start = left_pad.to(device=self.device, dtype=torch.long)
        if self.length + num_new > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {num_new} slots exceed max_len={self.max_len}")
        self._write, self.length = self.length, self.length + num_new
        slots = torch.arange(self._write, self.length, device=self.device)  # query slots [S]
        keys = torch.arange(self.length, device=self.device)  # key slots [L]
        real = keys[None, :] >= self.start[:, None]  # [B, L] not padding
        causal = keys[None, :] <= slots[:, None]  # [S, L]
        # A padding query sees only itself: a fully masked row would make SDPA return NaN, and NaN values at a
        # padding slot poison real rows through 0 * NaN in the attention-weighted sum.
        itself = keys[None, :] == slots[:, None]
        self._mask = ((real[:, None, :] & causal[None]) | itself[None])[:, None]  # [B, 1, S, L]
        return (slots[None, :] - self.start[:, None]).clamp(min=0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, S, Hkv, D] for the reserved slots -> all keys and values so far [B, Hkv, L, D]."""
        if self.static:
            # index_copy_ with a device-side slot: no host value is baked into a captured graph.
            self.keys[layer].index_copy_(2, self._slot, k.transpose(1, 2).to(self.keys[layer].dtype))
            self.values[layer].index_copy_(2, self._slot, v.transpose(1, 2).to(self.values[layer].dtype))
            return self.keys[layer], self.values[layer]
        if k.shape[1] != self.length - self._write:
            raise RuntimeError(f"KVCache.update got {k.shape[1]} new positions but {self.length - self._write} "
                               "were reserved (call reserve(num_new) before each forward)")
        self.keys[layer][:, :, self._write : self.length] = k.transpose(1, 2)
        self.values[layer][:, :, self._write : self.length] = v.transpose(1, 2)
        return self.keys[layer][:, :, : self.length], self.values[layer][:, :, : self.length]

    @property
    def attn_mask(self) -> torch.Tensor:
        """[B, 1, S, L] bool: True where a query may attend to a cached key."""
        if self.static:
            return self._static_mask
        if self._mask is None:
            raise RuntimeError("KVCache.attn_mask read before reserve()")
        return self._mask

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch and stop costing compute)."""
        rows = rows.to(self.device)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.start = self.start.index_select(0, rows)
        if self._mask is not None:
            self._mask = self._mask.index_select(0, rows)

    # --------------------------------------------------------------------------------------- static mode

    def begin_static(self) -> torch.Tensor:
        """Switch to fixed shapes for one-token steps: attention over all max_len slots under a validity mask.

        Returns the positions buffer [B, 1] that every static_step() refreshes in place.
        """
        keys = torch.arange(self.max_len, device=self.device)
        valid = (keys[None, :] >= self.start[:, None]) & (keys[None, :] < self.length)
        self._static_mask = valid[:, None, None, :].contiguous()  # [B, 1, 1, max_len]
        self._slot = torch.full((1,), self.length, dtype=torch.long, device=self.device)
        self._static_positions = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)
        self.static = True
        return self._static_positions

    def static_step(self) -> None:
        """Before a static one-token forward: open the write slot in the mask and set the positions.

        Device-side only (no host sync), so a GPU can run ahead; call static_advance() after the forward.
        """
        if self.length >= self.max_len:
            raise ValueError(f"KV cache full: max_len={self.max_len}")
        self._static_mask.index_fill_(-1, self._slot, True)
        self._static_positions.copy_((self._slot - self.start)[:, None])

    def static_advance(self) -> None:
        self._slot.add_(1)
        self.length += 1


# ------------------------------------------------------------------------------------------- sampling


def row_generator(seed: int, row_id: int, device: torch.device) -> torch.Generator:
    """The random stream of one prompt: a function of (seed, row_id) only."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, row_id & 0xFFFFFFFFFFFFFFFF]).generate_state(2)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 31 ^ int(state[1]))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] -> the same with tokens outside the top-k and outside the top-p nucleus set to -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches top_p (always >= 1 token).
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # A token goes when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int = 0, top_p: float = 1.0,
                generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """logits [B, V] (fp32) -> next token ids [B]; row b draws from generators[b] (global RNG when None)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    if generators is None:
        noise = torch.empty_like(probs).exponential_()
    else:
        noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=g) for g in generators])
    return (probs / noise).argmax(dim=-1)


def _checked(model: Transformer, prompts, row_ids, max_new_tokens: int, temperature: float, top_k: int,
             top_p: float) -> tuple[list[list[int]], list[int]]:
    """(prompts as lists of ints, each prompt's row id), every argument checked (no prompts: nothing to check)."""
    prompts = [list(map(int, p)) for p in prompts]
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    if not prompts:
        return [], []
    if len(row_ids) != len(prompts):
        raise ValueError(f"row_ids has {len(row_ids)} entries for {len(prompts)} prompts")
    vocab = model.cfg.vocab_size
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (give at least one token, e.g. the BOS or EOD id)")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has a token id outside [0, {vocab})")
        if len(p) + max_new_tokens > model.cfg.max_seq_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                             f"model.max_seq_len={model.cfg.max_seq_len}")
    return prompts, row_ids


def _stop_set(eod_id: int | None, stop_at_eod: bool, stop_ids: Collection[int]) -> set[int]:
    stops = {int(i) for i in stop_ids}
    if stop_at_eod and eod_id is not None:
        stops.add(int(eod_id))
    return stops


def _generators(seed: int | None, row_ids: Sequence[int], device: torch.device) -> list[torch.Generator] | None:
    return None if seed is None else [row_generator(seed, int(r), device) for r in row_ids]


def _logits_last(model: Transformer, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    # Only the last position feeds sampling: the head runs on [B, dim], never on the whole prefill.
    h = model.hidden_states(ids, positions=positions, kv_cache=cache)[:, -1]
    return model.lm_head(h).float()


@torch.no_grad()
def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eod_id: int | None = None,
             seed: int | None = None, stop_at_eod: bool = True, stop_ids: Collection[int] = (),
             row_ids: Sequence[int] | None = None, decode: DecodeMode = "dynamic") -> list[list[int]]:
    """Sample a continuation for each prompt (lists of token ids) in one batch; returns them without the prompt.

    A row stops after max_new_tokens or right after emitting `eod_id` (when stop_at_eod) or any of `stop_ids`;
    the stopping token is INCLUDED as the last element, so a caller can tell a finished document from a
    truncated one. `row_ids` (default 0..B-1) name each prompt's random stream (docs/training.md);
    pass global indices when a set of prompts is split over batches or ranks.
    """
    prompts, row_ids = _checked(model, prompts, row_ids, max_new_tokens, temperature, top_k, top_p)
    if not prompts:
        return []
    device = model.embed_tokens.weight.device
    if decode not in ("dynamic", "static", "cuda_graph"):
        raise ValueError(f"decode must be 'dynamic', 'static' or 'cuda_graph', got {decode!r}")
    if decode == "cuda_graph" and device.type != "cuda":
        raise ValueError("decode='cuda_graph' needs the model on a CUDA device")
    stops = _stop_set(eod_id, stop_at_eod, stop_ids)
    gens = _generators(seed, row_ids, device)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    # Right-aligned prompts; the pad id is irrelevant (masked), 0 is always a valid id.
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):] = torch.tensor(p)
    pad = torch.tensor([longest - n for n in lengths])
    # The last sampled token is never fed back, hence - 1.
    cache = KVCache(model.cfg, len(prompts), longest + max_new_tokens - 1, device, model.embed_tokens.weight.dtype)
    positions = cache.reserve(longest, left_pad=pad)
    logits = _logits_last(model, ids.to(device), positions, cache)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    if decode == "dynamic":
        return _decode_dynamic(model, cache, logits, max_new_tokens, stops, gens, sampling)
    return _decode_static(model, cache, logits, max_new_tokens, stops, gens, sampling, decode == "cuda_graph")


def _decode_dynamic(model, cache: KVCache, logits, max_new_tokens, stops, gens, sampling) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(cache.batch_size)]
    alive = list(range(cache.batch_size))  # original row of each cache row
    for step in range(max_new_tokens):
        nxt = sample_next(logits, generators=gens, **sampling)
        keep = []
        for j, tok in enumerate(nxt.tolist()):
            out[alive[j]].append(tok)
            if tok not in stops:
                keep.append(j)
        if step == max_new_tokens - 1 or not keep:
            break
        if len(keep) < len(alive):
            rows = torch.tensor(keep, device=nxt.device)
            cache.keep(rows)
            nxt = nxt.index_select(0, rows)
            alive = [alive[j] for j in keep]
            gens = None if gens is None else [gens[j] for j in keep]
        positions = cache.reserve(1)
        logits = _logits_last(model, nxt[:, None], positions, cache)
    return out


class _StaticDecoder:
    """One-token forwards with fixed shapes; on CUDA, optionally captured once as a CUDA graph and replayed.

    The inputs (token buffer, positions buffer, cache slot and mask) are updated in place before each call, so
    the captured kernels read the new values from the same addresses.
    """

    def __init__(self, model: Transformer, cache: KVCache, use_graph: bool):
        self.model, self.cache = model, cache
        self.positions = cache.begin_static()
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)
        self.graph = None
        if use_graph:
            self._capture()

    def _forward(self) -> torch.Tensor:
        return _logits_last(self.model, self.tokens, self.positions, self.cache)

    def _capture(self) -> None:
        # Warm-up runs on a side stream (allocator and library handles settle before capture). They write
        # keys/values into the current slot, which the first real step overwrites; the mask is untouched.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens[:, None])
        self.cache.static_step()
        if self.graph is None:
            logits = self._forward()
        else:
            self.graph.replay()
            logits = self.logits
        self.cache.static_advance()
        return logits


# Static decoding checks for "every row finished" this often: each check is a host sync.
_STATIC_STOP_CHECK_EVERY = 16


def _decode_static(model, cache: KVCache, logits, max_new_tokens, stops, gens, sampling,
                   use_graph: bool) -> list[list[int]]:
    """Fixed batch: finished rows keep computing (shapes must not change) but their tokens are discarded."""
    decoder = None  # built at the first step that needs it: with max_new_tokens=1 the cache has no free slot
    tokens = torch.zeros(cache.batch_size, max_new_tokens, dtype=torch.long, device=cache.device)
    stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=cache.device)
    finished = torch.zeros(cache.batch_size, dtype=torch.bool, device=cache.device)
    steps = max_new_tokens
    for step in range(max_new_tokens):
        nxt = sample_next(logits, generators=gens, **sampling)
        tokens[:, step] = nxt
        finished |= torch.isin(nxt, stop_ids)
        if step == max_new_tokens - 1 or ((step + 1) % _STATIC_STOP_CHECK_EVERY == 0 and bool(finished.all())):
            steps = step + 1
            break
        decoder = decoder or _StaticDecoder(model, cache, use_graph)
        logits = decoder(nxt)
    rows = tokens[:, :steps].tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


@torch.no_grad()
def sample_without_cache(model: Transformer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eod_id: int | None = None,
                         seed: int | None = None, stop_at_eod: bool = True, stop_ids: Collection[int] = (),
                         row_ids: Sequence[int] | None = None) -> list[list[int]]:
    """Reference for generate(): one prompt at a time, the whole sequence recomputed for every token."""
    prompts, row_ids = _checked(model, prompts, row_ids, max_new_tokens, temperature, top_k, top_p)
    device = model.embed_tokens.weight.device
    stops = _stop_set(eod_id, stop_at_eod, stop_ids)
    out = []
    for prompt, row_id in zip(prompts, row_ids):
        gens = _generators(seed, [row_id], device)
        seq, new = list(prompt), []
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([seq], device=device))[:, -1]
            tok = int(sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generators=gens)[0])
            seq.append(tok)
            new.append(tok)
            if tok in stops:
                break
        out.append(new)
    return out


# ------------------------------------------------------------------------------------------- tools' helpers


def find_tokenizer_dir(checkpoint_arg: str | os.PathLike, step_dir: Path) -> Path | None:
    """The tokenizer that goes with a checkpoint: STEP_DIR/tokenizer (imported checkpoints), else the run's
    RUN_DIR/tokenizer (RUN_DIR = the directory given, or the step directory's grandparent)."""
    candidates = [step_dir / "tokenizer", Path(checkpoint_arg) / "tokenizer", step_dir.parent.parent / "tokenizer"]
    return next((c for c in candidates if c.is_dir()), None)


def load_model_and_tokenizer(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                             require_tokenizer: bool = True):
    """(model in eval mode, Config, Tokenizer or None, step directory) for the command-line tools.

    Raises FileNotFoundError naming where it looked when a tokenizer is required but none is given or found.
    """
    from megasynth.checkpoint import load_for_inference, resolve_checkpoint  # noqa: PLC0415
    from megasynth.tokenizer import load_tokenizer  # noqa: PLC0415

    step_dir = resolve_checkpoint(checkpoint)
    tok_dir = Path(tokenizer) if tokenizer else find_tokenizer_dir(checkpoint, step_dir)
    tok = None
    if tok_dir is not None:
        tok = load_tokenizer(tok_dir)
    elif require_tokenizer:
        raise FileNotFoundError(f"{checkpoint}: no tokenizer/ directory in the checkpoint or its run directory; "
                                "pass --tokenizer DIR")
    model, cfg = load_for_inference(step_dir, device=device, dtype=dtype)
    if tok is not None and tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"{tok_dir}: the tokenizer has {tok.vocab_size} ids but the model's vocabulary is "
                         f"{cfg.model.vocab_size} ({step_dir}/config.toml): wrong tokenizer for this checkpoint?")
    return model, cfg, tok, step_dir


def add_model_arguments(parser) -> None:
    """--checkpoint, --tokenizer, --device and --dtype of a model tool: what run_with_model loads."""
    parser.add_argument("--checkpoint", required=True, metavar="RUN_OR_STEP_DIR",
                        help="a run directory (its newest complete checkpoint) or one step_XXXXXXXX directory")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenizer directory (default: the checkpoint's tokenizer/ or RUN_DIR/tokenizer)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to run (default auto: CUDA when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="model dtype (default float32)")


def run_with_model(args, run, *, require_tokenizer: bool = True) -> int:
    """A model tool's frame: the process group (torchrun's, or none) on --device, the --checkpoint and --tokenizer
    loaded in --dtype (a bad one: one stderr line, exit code 2), then run(model, cfg, tokenizer, step_dir, info)."""
    from megasynth.checkpoint import CheckpointError  # noqa: PLC0415
    from megasynth.distributed import destroy_distributed, init_distributed  # noqa: PLC0415

    info = init_distributed(tp=1, device=args.device)
    try:
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        try:
            loaded = load_model_and_tokenizer(args.checkpoint, args.tokenizer, info.device, dtype,
                                              require_tokenizer=require_tokenizer)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return run(*loaded, info)
    finally:
        destroy_distributed()


def default_start_ids(tokenizer) -> list[int]:
    """What a prompt starts with: BOS when the tokenizer has one, else EOD (training documents follow an EOD)."""
    return [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eod_id]
