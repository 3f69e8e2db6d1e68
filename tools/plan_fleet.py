"""Plan a synthetic-data job on a fleet: GPU-hours, wall time on G GPUs and the dollar cost (docs/cluster.md).

    # from a short calibration run's work directory (its unit records hold tokens and seconds):
    python tools/plan_fleet.py --tokens 100B --calibration runs/calib/synth.work --gpus 8,64,512 --usd-per-gpu-hour 2
    # or from a measured rate:
    python tools/plan_fleet.py --tokens 100B --tokens-per-s 10000 --gpus 64,256,1024 --usd-per-gpu-hour 2.5

The rate is one worker's (one process, --gpus-per-worker GPUs); --overhead adds the share of time lost to
restarts, stragglers and publishing. Library: megasynth.fleet_plan.
"""

from __future__ import annotations

import argparse
import sys

from megasynth.cli import ToolParser, nonnegative_float, positive_float
from megasynth.fleet_plan import FleetPlanError, calibrated_rate, fleet_plan, render
from megasynth.mixture import MixtureError, parse_token_count


def _gpu_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU counts separated by commas, e.g. 8,64,512; got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected GPU counts >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", required=True, metavar="T",
                   help="synthetic tokens wanted, with an optional K/M/B/T suffix (e.g. 100B)")
    rate = p.add_mutually_exclusive_group(required=True)
    rate.add_argument("--tokens-per-s", type=positive_float, metavar="R", help="tokens per second of one worker")
    rate.add_argument("--calibration", metavar="WORK_DIR",
                      help="a short run's work directory (--worker mode): its units' tokens over their seconds")
    p.add_argument("--gpus", type=_gpu_list, default=[8, 64, 512], metavar="G1,G2",
                   help="fleet sizes to show (default 8,64,512)")
    p.add_argument("--gpus-per-worker", type=int, default=1, metavar="K",
                   help="GPUs one worker uses (tensor parallelism of a large synthesizer; default 1)")
    p.add_argument("--usd-per-gpu-hour", type=nonnegative_float, default=0.0, metavar="P",
                   help="price of one GPU-hour in US$ (default 0: no cost column worth reading)")
    p.add_argument("--overhead", type=nonnegative_float, default=0.1, metavar="F",
                   help="extra share of time for restarts, stragglers and publishing (default 0.1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tokens = parse_token_count(args.tokens, "--tokens")
        if args.calibration:
            rate, units = calibrated_rate(args.calibration)
            print(f"calibration: {rate:,.0f} tokens/s per worker over {units} units of {args.calibration}")
        else:
            rate = args.tokens_per_s
        rows = fleet_plan(tokens, rate, gpus=args.gpus, gpus_per_worker=args.gpus_per_worker,
                          usd_per_gpu_hour=args.usd_per_gpu_hour, overhead=args.overhead)
    except (FleetPlanError, MixtureError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(rows, tokens, rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
