"""The repetition calculus of a data mixture, and compute-matched run plans (real vs real + synthetic vs oracle).

    rows = repetition_rows([MixtureSource("real", 500e9, 0.2), MixtureSource("web", 5e12, 0.8)], 10e12)
    print(render_repetition_table(rows, 10e12, max_repetition=8))

The epochs formula, the three compute-matched runs (SBP, Yang et al. 2025) and tools/plan_mixture.py:
docs/blending.md.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from megasynth.config import Config, config_from_dict, config_to_dict

# Decimal suffixes (token counts are quoted in powers of ten: "a 10T-token horizon"). Upper or lower case.
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12, "P": 10**15}
_COUNT_RE = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]?)\s*$")


class MixtureError(ValueError):
    """A bad source, weight, count or horizon; the message names the offending text."""


# ----------------------------------------------------------------------------------------------- counts


def parse_token_count(text: str, what: str = "token count") -> int:
    """'0.5T' -> 500_000_000_000, '10B', '3e9', '1_000', '250k' -> integers (suffixes K M B/G T P, powers of 10)."""
    m = _COUNT_RE.match(str(text))
    if not m or m.group(2).upper() not in _SUFFIXES:
        raise MixtureError(f"{what} {text!r}: expected a number with an optional K/M/B/T suffix, e.g. 0.5T or 3e9")
    value = float(m.group(1).replace("_", "")) * _SUFFIXES[m.group(2).upper()]
    if not math.isfinite(value) or value < 0:
        raise MixtureError(f"{what} {text!r}: must be a finite, non-negative number")
    return int(round(value))


def format_count(n: float) -> str:
    """A compact decimal rendering: 1234 -> '1234', 5e11 -> '500.00B', 1.2e13 -> '12.00T'."""
    n = float(n)
    for suffix, scale in (("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}" if n == int(n) else f"{n:.2f}"


# ----------------------------------------------------------------------------------------------- repetition


@dataclass(frozen=True)
class MixtureSource:
    """One source of a mixture: a name, its unique tokens, its (unnormalised) weight, and its prefix if any."""

    name: str
    unique_tokens: int
    weight: float = 1.0
    prefix: str | None = None


@dataclass(frozen=True)
class RepetitionRow:
    name: str
    unique_tokens: int
    share: float
    """Normalised weight: the fraction of the horizon's training tokens drawn from this source."""
    horizon_tokens: float
    """Tokens this source contributes over the horizon (share x horizon)."""
    epochs: float
    """How many times the source is read: horizon_tokens / unique_tokens."""


def normalise_weights(weights: Sequence[float], names: Sequence[str]) -> list[float]:
    """Weights / their sum; every weight must be finite and >= 0 and at least one > 0 (errors name the source)."""
    if not weights:
        raise MixtureError("a mixture needs at least one source")
    for name, w in zip(names, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise MixtureError(f"{name}: weight must be a finite number >= 0, got {w!r}")
    total = math.fsum(weights)
    if total <= 0:
        raise MixtureError(f"every weight is 0 ({', '.join(names)}): at least one source needs a positive weight")
    return [w / total for w in weights]


def repetition_rows(sources: Sequence[MixtureSource], horizon_tokens: float) -> list[RepetitionRow]:
    """One row per source: share, tokens contributed over the horizon, epochs = horizon x share / unique tokens
    (0 when the source is not drawn from)."""
    if horizon_tokens < 0 or not math.isfinite(horizon_tokens):
        raise MixtureError(f"the horizon must be a finite number of tokens >= 0, got {horizon_tokens!r}")
    shares = normalise_weights([s.weight for s in sources], [s.name for s in sources])
    rows = []
    for s, share in zip(sources, shares):
        if s.unique_tokens <= 0 and share > 0:
            raise MixtureError(f"{s.name}: holds {s.unique_tokens} tokens but has weight {s.weight}; "
                               "it cannot be drawn from")
        epochs = horizon_tokens * share / s.unique_tokens if share > 0 else 0.0
        rows.append(RepetitionRow(s.name, int(s.unique_tokens), share, horizon_tokens * share, epochs))
    return rows


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A plain fixed-width text table; `align` holds 'l' or 'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render_repetition_table(rows: Sequence[RepetitionRow], horizon_tokens: float, *,
                            max_repetition: float = 8.0, title: str = "") -> str:
    """The repetition table printed before training and by tools/plan_mixture.py; deterministic text."""
    body = []
    for r in rows:
        warn = f"WARNING: > {max_repetition:g} epochs" if r.epochs > max_repetition else ""
        body.append([r.name, format_count(r.unique_tokens), f"{100 * r.share:.2f}%", format_count(r.horizon_tokens),
                     f"{r.epochs:.2f}", warn])
    table = render_table(["source", "unique tokens", "share", "tokens over horizon", "epochs", "warning"], body,
                         "lrrrrl")
    head = f"{title + ': ' if title else ''}repetition over a horizon of {format_count(horizon_tokens)} training tokens"
    return f"{head} (data.max_repetition = {max_repetition:g})\n{table}"


def max_epochs(rows: Sequence[RepetitionRow]) -> float:
    return max((r.epochs for r in rows), default=0.0)


# ----------------------------------------------------------------------------------------------- FLOPs


def training_flops_per_token(cfg: Config) -> float:
    from megasynth.model import flops_per_token  # noqa: PLC0415 - torch is only needed for FLOP horizons

    return flops_per_token(cfg.model, cfg.data.seq_len)


def generation_flops(model_cfg, tokens: float) -> float:
    """FLOPs to generate `tokens` with a model: ~2 x matmul parameters x tokens (one forward per token).

    Matmul parameters are every projection plus the output head (the input embedding is a lookup, not a
    matmul); attention over the context and the prompt's prefill are not counted. With seq_len = 0,
    flops_per_token (3 x forward, no attention term) is exactly 3 x this per token.
    """
    from megasynth.model import flops_per_token  # noqa: PLC0415

    if tokens < 0:
        raise MixtureError(f"synthetic tokens must be >= 0, got {tokens!r}")
    return flops_per_token(model_cfg, 0) / 3.0 * tokens


# ----------------------------------------------------------------------------------------------- compute matching


@dataclass
class PlannedRun:
    """One run of a compute-matched plan: its Config, the mixture behind it, and FLOPs charged to it."""

    name: str
    config: Config
    sources: list[MixtureSource]
    horizon_tokens: int
    train_flops: float
    synthesis_flops: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.synthesis_flops

    def rows(self) -> list[RepetitionRow]:
        return repetition_rows(self.sources, self.horizon_tokens)


def plan_compute_matched(base: Config, *, real: MixtureSource, synthetic: MixtureSource, oracle: MixtureSource,
                         horizon_tokens: int, runs_root: str | os.PathLike, synthesis_flops: float = 0.0
                         ) -> list[PlannedRun]:
    """baseline / synthetic / oracle runs sharing base's model, seq_len, global batch and steps.

    steps = ceil(horizon / (global_batch x seq_len)), so every run trains on exactly steps x global_batch x
    seq_len tokens (>= the requested horizon) at the same FLOPs. The synthetic run's synthetic weight is
    synthetic tokens / horizon, capped at 1 (seen about once); the real data fills the rest.
    """
    for role, src in (("real", real), ("synthetic", synthetic), ("oracle", oracle)):
        if src.unique_tokens <= 0:
            raise MixtureError(f"--{role} {src.name}: holds no tokens")
    if horizon_tokens <= 0:
        raise MixtureError(f"the horizon must be a positive number of tokens, got {horizon_tokens}")
    per_step = base.train.global_batch_size * base.data.seq_len
    steps = max(1, -(-int(horizon_tokens) // per_step))  # ceil: the steps' batches cover the horizon
    horizon = steps * per_step
    train_flops = training_flops_per_token(base) * horizon

    syn_share = min(1.0, synthetic.unique_tokens / horizon)
    syn_sources = [replace(synthetic, weight=syn_share)]
    notes: dict[str, list[str]] = {"baseline": [], "synthetic": [], "oracle": []}
    if syn_share < 1.0:
        syn_sources.insert(0, replace(real, weight=1.0 - syn_share))
    else:
        notes["synthetic"].append(f"{synthetic.name} holds >= the horizon's tokens: the run reads no real data")
    mixtures = {"baseline": [replace(real, weight=1.0)], "synthetic": syn_sources,
                "oracle": [replace(oracle, weight=1.0)]}
    if oracle.unique_tokens <= real.unique_tokens:
        notes["oracle"].append(f"oracle {oracle.name} ({format_count(oracle.unique_tokens)}) is not larger than "
                               f"real {real.name} ({format_count(real.unique_tokens)})")

    runs = []
    for name, sources in mixtures.items():
        table = config_to_dict(base)
        table["data"]["data_path"] = ""
        # A count-only source has no files yet: its name stands in for the path until the data exists.
        table["data"]["sources"] = [{"path": s.prefix or s.name, "weight": s.weight, "name": s.name} for s in sources]
        table["train"]["steps"] = steps
        table["train"]["run_dir"] = os.fspath(Path(runs_root) / name)
        notes[name] += [f"data.sources path {s.name!r} is a placeholder: {s.name} was given as a token count"
                        for s in sources if s.prefix is None]
        runs.append(PlannedRun(name, config_from_dict(table), sources, horizon, train_flops,
                               synthesis_flops if name == "synthetic" else 0.0, notes[name]))
    return runs
