"""Run a stage as independent workers on a Ray cluster, then publish its output (docs/cluster.md).

    python tools/run_on_ray.py --workers 64 --gpus-per-worker 1 synthesize -- \\
        --checkpoint runs/synthesizer --corpus data/real --output-prefix /shared/synth --num-docs 10000000
    python tools/run_on_ray.py --workers 8 --address auto preprocess_data -- --input '/shared/web/*.jsonl.zst' \\
        --tokenizer tok/ --output-prefix /shared/data/web

Every task runs `tools/STAGE.py ARGS --worker I/N --no-publish` (the same worker a Slurm array task or a hand-started
process runs); Ray retries a task whose process or node died, and the retry skips the units already published in
the work directory. Then `tools/STAGE.py ARGS --publish` runs here: exit code 0 with the output, or 2 naming the
units still missing (rerun the same command: finished units are kept). The work directory (the stage's --work-dir)
and the output must be on a filesystem every Ray node sees. Needs `pip install 'megasynth[ray]'`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from megasynth.cli import ToolParser, nonnegative_float, positive_float
from megasynth.launch_ray import STAGES, run_on_ray


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES, help="the tool whose workers run (tools/STAGE.py)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the stage's own arguments, after --")
    p.add_argument("--workers", type=int, required=True, metavar="N", help="Ray tasks, i.e. workers I/N")
    p.add_argument("--gpus-per-worker", type=nonnegative_float, default=0.0, metavar="G",
                   help="GPUs Ray reserves for each task (default 0; 1 for synthesis on GPUs)")
    p.add_argument("--cpus-per-worker", type=positive_float, default=1.0, metavar="C",
                   help="CPUs Ray reserves for each task (default 1)")
    p.add_argument("--max-retries", type=int, default=3, metavar="R",
                   help="times Ray runs a task again after its process or node died or it exited non-zero (default 3)")
    p.add_argument("--address", metavar="ADDR", help="the Ray cluster to join (e.g. auto, ray://head:10001); default: "
                   "start a local Ray for this run")
    p.add_argument("--num-cpus", type=int, metavar="C", help="CPUs of the local Ray this starts (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stage_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    if args.workers < 1 or args.max_retries < 0:
        parser.error("--workers must be >= 1 and --max-retries >= 0")
    if any(a == "--worker" or a.startswith("--worker=") or a in ("--publish", "--no-publish") for a in stage_args):
        parser.error("the stage's --worker/--publish/--no-publish are set by this launcher; leave them out")
    if importlib.util.find_spec("ray") is None:
        print("error: Ray is not installed: pip install 'megasynth[ray]' (or pip install ray)", file=sys.stderr)
        return 2
    return run_on_ray(args.stage, stage_args, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                      cpus_per_worker=args.cpus_per_worker, max_retries=args.max_retries, address=args.address,
                      num_cpus=args.num_cpus)


if __name__ == "__main__":
    sys.exit(main())
