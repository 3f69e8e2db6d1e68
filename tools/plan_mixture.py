"""Plan a data mixture: how often each source is repeated over a training horizon, and compute-matched runs.

    # sources in Megatron's syntax: WEIGHT SOURCE pairs (or one bare SOURCE); a SOURCE is a dataset prefix
    # or NAME=COUNT with a K/M/B/T suffix
    python tools/plan_mixture.py --tokens 10T 0.2 real=0.5T 0.5 web=5T 0.3 code=4.5T
    python tools/plan_mixture.py --flops 1e23 --config examples/configs/llama-1b.toml 0.3 data/books 0.7 data/web
    python tools/plan_mixture.py --config run.toml     # the config's own sources over steps x batch x seq_len

    # three configs with equal model, seq_len, global batch and steps (so equal tokens and FLOPs):
    # baseline (real repeated), synthetic (real + synthetic seen ~once), oracle (more unique real data)
    python tools/plan_mixture.py --compute-matched --config examples/configs/llama-1b.toml --tokens 20B \
        --real data/real --synthetic data/sbp --oracle data/real_large --out plans/sbp \
        --synthesizer-config examples/configs/llama-1b.toml --synthetic-tokens 2B

The calculus lives in megasynth/mixture.py (epochs = horizon x share / unique tokens). The three configs are
published together like a prefix (baseline.toml last: a reader sees the complete old or the complete new plan);
other files in OUT (e.g. the default runs root OUT/runs) are left alone. An existing plan is refused unless
--overwrite (which replaces only the three configs), and an OUT that is, holds or sits inside an input is
refused. Exit code 2 on bad input, with the offending file, flag or token named.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

from megasynth.cli import ToolParser, check_outputs, directory, nonnegative_float, positive_float
from megasynth.config import Config, ConfigError, config_to_dict, load_config
from megasynth.data.blend import BlendError, parse_data_path
from megasynth.io import atomic_files
from megasynth.io import atomic_write_text
from megasynth.mixture import (
    MixtureError,
    MixtureSource,
    PlannedRun,
    format_count,
    generation_flops,
    parse_token_count,
    plan_compute_matched,
    render_repetition_table,
    render_table,
    repetition_rows,
    training_flops_per_token,
)

EXIT_BAD_INPUT = 2
PLAN_FILES = ("baseline.toml", "synthetic.toml", "oracle.toml")  # what --overwrite replaces in --out


def format_flops(f: float) -> str:
    return f"{f:.3g}"


def resolve_source(spec: str, weight: float = 1.0, name: str = "") -> MixtureSource:
    """A dataset prefix (its unique tokens read from the .idx) or `NAME=COUNT` (e.g. `real=0.5T`)."""
    from megasynth.data.indexed import IndexedDataset, prefix_exists  # noqa: PLC0415

    spec = str(spec)
    if prefix_exists(spec):
        return MixtureSource(name or os.path.basename(spec), IndexedDataset(spec).num_tokens, weight, spec)
    if "=" in spec:
        label, count = spec.rsplit("=", 1)
        if not label:
            raise MixtureError(f"source {spec!r}: the name before '=' is empty (expected NAME=COUNT, e.g. real=0.5T)")
        return MixtureSource(name or label, parse_token_count(count, f"source {spec!r}: count"), weight, None)
    raise MixtureError(f"source {spec!r}: no dataset prefix {spec}.bin/.idx and not NAME=COUNT (e.g. real=0.5T)")


def render_plan_summary(runs: list[PlannedRun]) -> str:
    """One line per run: mixture, steps, tokens, training / synthesis / total FLOPs."""
    body = []
    for run in runs:
        t = run.config.train
        mix = " + ".join(f"{r.share:.3f} {r.name} ({r.epochs:.2f} ep)" for r in run.rows())
        body.append([run.name, mix, str(t.steps), format_count(run.horizon_tokens), format_flops(run.train_flops),
                     format_flops(run.synthesis_flops), format_flops(run.total_flops)])
    return render_table(["run", "mixture (share, epochs)", "steps", "tokens", "train FLOPs", "synthesis FLOPs",
                         "total FLOPs"], body, "llrrrrr")


def write_run_config(run: PlannedRun, path: Path) -> Path:
    """Write run.config as TOML (loadable by load_config) under a comment header describing the plan; atomic."""
    import tomli_w  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    header = [f"# Compute-matched run '{run.name}' (written by tools/plan_mixture.py --compute-matched).",
              f"# {run.config.train.steps} steps x {run.config.train.global_batch_size} sequences x "
              f"{run.config.data.seq_len} tokens = {run.horizon_tokens} training tokens, "
              f"{run.train_flops:.4g} training FLOPs (+ {run.synthesis_flops:.4g} synthesis FLOPs).",
              *(f"# {r.name}: share {r.share:.4f}, {r.epochs:.3f} epochs of {r.unique_tokens} unique tokens"
                for r in run.rows()),
              *(f"# NOTE: {n}" for n in run.notes)]
    text = "\n".join(header) + "\n\n" + tomli_w.dumps(config_to_dict(run.config))
    atomic_write_text(path, text)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(
        prog="tools/plan_mixture.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("sources", nargs="*", metavar="WEIGHT SOURCE",
                   help="the mixture in Megatron's syntax: '0.3 data/a 0.7 b=2T' (WEIGHT SOURCE pairs) or one bare "
                        "SOURCE; a SOURCE is a dataset prefix (its unique tokens are read from the .idx) or NAME=COUNT "
                        "like real=0.5T; default: the sources of --config")
    p.add_argument("--tokens", metavar="N", help="the horizon in training tokens, e.g. 10T, 2.5B, 3e9")
    p.add_argument("--flops", metavar="F", type=positive_float,
                   help="the horizon in training FLOPs (needs --config: tokens = F / flops_per_token(model, seq_len))")
    p.add_argument("--config", metavar="TOML",
                   help="a training config: its model and seq_len convert --flops to tokens; without --tokens or "
                        "--flops its steps x global_batch_size x seq_len is the horizon; it is the base of "
                        "--compute-matched; its data.max_repetition is the warning threshold")
    p.add_argument("--max-repetition", type=positive_float, metavar="E",
                   help="warn for sources read more than E epochs (default: the config's data.max_repetition, else 8)")
    g = p.add_argument_group("compute-matched runs")
    g.add_argument("--compute-matched", action="store_true",
                   help="write baseline.toml, synthetic.toml and oracle.toml to --out (needs --config, --real, "
                        "--synthetic, --oracle and a horizon)")
    g.add_argument("--real", metavar="SOURCE", help="the real data (prefix or NAME=COUNT), repeated by the baseline")
    g.add_argument("--synthetic", metavar="SOURCE",
                   help="the synthetic data; its weight is its tokens / horizon (capped at 1), so it is seen ~once")
    g.add_argument("--oracle", metavar="SOURCE", help="a larger unique real set (the oracle run reads it alone)")
    g.add_argument("--out", metavar="DIR", help="where the three configs are written (other files there are kept)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing plan in --out (default: refuse, exit 2)")
    g.add_argument("--runs-root", metavar="DIR",
                   help="each config's train.run_dir is RUNS_ROOT/<run name> (default: OUT/runs)")
    g.add_argument("--synthesis-flops", type=nonnegative_float, metavar="F",
                   help="FLOPs spent generating the synthetic data, charged to the synthetic run")
    g.add_argument("--synthesizer-config", metavar="TOML",
                   help="instead of --synthesis-flops: the generator's config; synthesis FLOPs = 2 x its matmul "
                        "parameters x --synthetic-tokens")
    g.add_argument("--synthetic-tokens", metavar="N",
                   help="tokens generated, for --synthesizer-config (default: the synthetic source's tokens)")
    return p


def resolve_horizon(args, cfg: Config | None) -> int:
    if args.tokens is not None and args.flops is not None:
        raise MixtureError("give --tokens or --flops, not both")
    if args.tokens is not None:
        return parse_token_count(args.tokens, "--tokens")
    if args.flops is not None:
        if cfg is None:
            raise MixtureError("--flops needs --config (the model and seq_len give the FLOPs per token)")
        if not math.isfinite(args.flops) or args.flops <= 0:
            raise MixtureError(f"--flops must be a positive number, got {args.flops!r}")
        return int(args.flops // training_flops_per_token(cfg))  # Megatron's FLOPs formula at cfg's seq_len
    if cfg is not None:
        return cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len
    raise MixtureError("no horizon: give --tokens N, or --flops F with --config, or --config alone")


def synthesis_flops(args, synthetic) -> float:
    if args.synthesis_flops is not None and args.synthesizer_config is not None:
        raise MixtureError("give --synthesis-flops or --synthesizer-config, not both")
    if args.synthesis_flops is not None:
        if args.synthesis_flops < 0:
            raise MixtureError(f"--synthesis-flops must be >= 0, got {args.synthesis_flops}")
        return args.synthesis_flops
    if args.synthesizer_config is not None:
        tokens = (parse_token_count(args.synthetic_tokens, "--synthetic-tokens") if args.synthetic_tokens
                  else synthetic.unique_tokens)
        return generation_flops(load_config(args.synthesizer_config).model, tokens)
    if args.synthetic_tokens is not None:
        raise MixtureError("--synthetic-tokens is used with --synthesizer-config")
    return 0.0


def run_compute_matched(args, cfg: Config | None, max_rep: float) -> None:
    missing = [f"--{n}" for n in ("config", "real", "synthetic", "oracle", "out") if getattr(args, n) is None]
    if missing:
        raise MixtureError(f"--compute-matched needs {', '.join(missing)}")
    if args.sources:
        raise MixtureError("--compute-matched takes its sources from --real/--synthetic/--oracle, not positionally")
    real, synthetic, oracle = (resolve_source(s) for s in (args.real, args.synthetic, args.oracle))
    out = Path(args.out)
    runs = plan_compute_matched(cfg, real=real, synthetic=synthetic, oracle=oracle,
                                horizon_tokens=resolve_horizon(args, cfg),
                                runs_root=args.runs_root or out / "runs",
                                synthesis_flops=synthesis_flops(args, synthetic))
    try:
        with atomic_files(out, PLAN_FILES, commit="baseline.toml", replace=args.overwrite) as tmp:
            for run in runs:
                write_run_config(run, tmp / f"{run.name}.toml")
    except FileExistsError as e:  # a plan appeared while this one was made
        raise MixtureError(f"--out {e}") from None
    for run in runs:
        print(render_repetition_table(run.rows(), run.horizon_tokens, max_repetition=max_rep, title=run.name))
        for note in run.notes:
            print(f"note: {note}")
        print(f"-> {out / f'{run.name}.toml'}\n")
    print(render_plan_summary(runs))


def run_table(args, cfg: Config | None, max_rep: float) -> None:
    for flag in ("real", "synthetic", "oracle", "out", "runs_root", "synthesis_flops", "synthesizer_config",
                 "synthetic_tokens"):
        if getattr(args, flag) is not None:
            raise MixtureError(f"--{flag.replace('_', '-')} is used with --compute-matched")
    if args.overwrite:
        raise MixtureError("--overwrite is used with --compute-matched")
    if args.sources:
        specs = [(s.path, s.weight, "") for s in parse_data_path(" ".join(shlex.quote(a) for a in args.sources))]
    elif cfg is not None and (cfg.data.sources or cfg.data.data_path.strip()):
        data = cfg.data.sources or parse_data_path(cfg.data.data_path)
        specs = [(s.path, s.weight, s.name) for s in data]
    else:
        raise MixtureError("no sources: give WEIGHT SOURCE pairs, or a --config with data.sources or data.data_path")
    sources = [resolve_source(path, weight, name) for path, weight, name in specs]
    horizon = resolve_horizon(args, cfg)
    print(render_repetition_table(repetition_rows(sources, horizon), horizon, max_repetition=max_rep))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_outputs(parser, {"--out": directory(args.out, PLAN_FILES) if args.out else None},
                  {"SOURCE": args.sources, "--config": args.config, "--real": args.real, "--synthetic": args.synthetic,
                   "--oracle": args.oracle, "--synthesizer-config": args.synthesizer_config},
                  overwrite=args.overwrite)
    try:
        cfg = load_config(args.config) if args.config else None
        max_rep = args.max_repetition if args.max_repetition is not None else (cfg.data.max_repetition if cfg else 8.0)
        if args.compute_matched:
            run_compute_matched(args, cfg, max_rep)
        else:
            run_table(args, cfg, max_rep)
    except (ConfigError, MixtureError, BlendError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
