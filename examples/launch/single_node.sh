#!/usr/bin/env bash
# Train on every GPU of one machine (or N CPU processes) with torchrun.
#
#   examples/launch/single_node.sh examples/configs/llama-1b.toml --parallel.tp=2 --train.run_dir=runs/1b
#   NPROC=4 examples/launch/single_node.sh examples/configs/tiny.toml --data.data_path=data/train --train.device=cpu
#
# Arguments after the config are config overrides (--section.key=VALUE; `python -m megasynth.train --help`).
# The data-parallel degree is NPROC / parallel.tp. Rank 0 prints the log (--log.all_ranks=true: every rank).
#
# Environment:
#   NPROC      processes to start; default: the number of visible GPUs (nvidia-smi), else 1.
#   TORCHRUN   the launcher; default `torchrun`, e.g. TORCHRUN="python -m torch.distributed.run" when the
#              venv's bin/ is not on PATH.
#
# A rank that dies fails the whole job (torchrun stops the other ranks). Rerunning the same command continues
# from the newest complete checkpoint in train.run_dir (train.resume=auto, the default). To have torchrun
# restart the ranks itself, add e.g. TORCHRUN="torchrun --max-restarts=3": each restart resumes the same way.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage; exit 0; fi
if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
CONFIG="$1"
shift
if [[ ! -f "$CONFIG" ]]; then
    echo "$0: config file not found: $CONFIG" >&2
    exit 2
fi

if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    [[ "$NPROC" -ge 1 ]] 2>/dev/null || NPROC=1
fi

# --standalone: a local rendezvous on a free port, nothing to configure on one machine.
# OMP_NUM_THREADS=1 per rank unless set: N ranks x all cores of threads would oversubscribe the CPUs.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec ${TORCHRUN:-torchrun} --standalone --nproc_per_node="$NPROC" -m megasynth.train --config "$CONFIG" "$@"
