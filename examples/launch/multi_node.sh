#!/usr/bin/env bash
# Train across several machines with torchrun: run this same command on every node.
#
#   # on each of 4 nodes (8 GPUs each), node 0 at 10.0.0.1:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \
#       examples/launch/multi_node.sh examples/configs/llama-8b.toml --train.run_dir=/shared/runs/8b
#
# Arguments after the config are config overrides (--section.key=VALUE). WORLD_SIZE = NNODES x NPROC_PER_NODE;
# keep parallel.tp <= NPROC_PER_NODE so tensor-parallel traffic stays on NVLink inside a node, while FSDP (the
# dp mesh dim) spans the nodes. train.run_dir must be on a file system every node sees (checkpoints are
# written by all ranks, metrics by rank 0).
#
# Environment (what torchrun does with it):
#   NNODES          number of machines (torchrun --nnodes).
#   NODE_RANK       this machine's index, 0..NNODES-1 (--node_rank); node 0 hosts the rendezvous.
#   MASTER_ADDR     address of node 0, reachable from every node (--rdzv_endpoint host).
#   MASTER_PORT     a free TCP port on node 0 (default 29500) (--rdzv_endpoint port).
#   NPROC_PER_NODE  processes per node, normally the GPUs per node (default: visible GPUs, else 1).
#   RUN_ID          rendezvous id shared by the nodes of one job (default megasynth); change it per job when
#                   several jobs share node 0.
#   TORCHRUN        the launcher (default torchrun).
# torchrun then sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each
# rank; megasynth.distributed reads them and picks NCCL on GPUs (gloo on CPUs).
#
# NCCL settings worth knowing (export before running):
#   NCCL_SOCKET_IFNAME=eth0         the interface for bootstrap/socket traffic when nodes have several
#   NCCL_IB_HCA=mlx5                which InfiniBand adapters to use; NCCL_IB_DISABLE=1 forces TCP sockets
#   NCCL_DEBUG=WARN (or INFO)       INFO prints the chosen transports (NVLink, IB, sockets): check it once
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  abort the job when a collective fails instead of hanging (the default)
#   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  less fragmentation with FSDP's changing buffer sizes
# The collective timeout is 30 minutes (megasynth.distributed.init_distributed): long enough for a slow
# checkpoint write, short enough that a dead node ends the job.
#
# A dead rank fails the job on every node. Rerun the same command on every node: train.resume=auto continues
# from the newest complete checkpoint (a checkpoint saved at one node count loads at another).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage; exit 0; fi
if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
CONFIG="$1"
shift
for var in NNODES NODE_RANK MASTER_ADDR; do
    if [[ -z "${!var:-}" ]]; then
        echo "$0: set $var (see --help)" >&2
        exit 2
    fi
done
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    [[ "$NPROC_PER_NODE" -ge 1 ]] 2>/dev/null || NPROC_PER_NODE=1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# The c10d rendezvous runs in the torchrun agent of node 0 (at MASTER_ADDR:MASTER_PORT); every agent joins it,
# and --node_rank fixes which node holds global ranks 0..NPROC_PER_NODE-1.
exec ${TORCHRUN:-torchrun} \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" \
    --rdzv_id="${RUN_ID:-megasynth}" \
    -m megasynth.train --config "$CONFIG" "$@"
