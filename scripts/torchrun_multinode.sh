#!/usr/bin/env bash
# Start one node's share of a multi-node tokensel fit with torchrun. Run it once on every node, with the same
# MASTER_ADDR / MASTER_PORT / NNODES and a distinct NODE_RANK; the rest of the command line goes to
# `trainer fit` unchanged:
#   MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NNODES=2 NODE_RANK=0 NPROC_PER_NODE=8 \
#     scripts/torchrun_multinode.sh --config recipes/rho1.yaml --config configs/deepspeed/zero2.yaml
# `--trainer.num_nodes` and `--trainer.devices` are appended from NNODES / NPROC_PER_NODE (later arguments
# win, so a command line that sets them itself must agree). torchrun exports RANK, LOCAL_RANK, WORLD_SIZE,
# LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT to each worker; Lightning reads them (TorchElastic
# environment). If any worker dies, torchrun stops the others on every node and exits non-zero.
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR (address of the node with NODE_RANK=0)}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1, distinct per node)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NNODES="${NNODES:-1}"
NPROC_PER_NODE="${NPROC_PER_NODE:-1}"          # GPUs per node (CPU processes on a CPU machine)
PYTHON="${PYTHON:-python}"
# `fit` is the verb; drop it if the caller passed it too
if [[ "${1:-}" == "fit" ]]; then shift; fi
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m tokensel fit "$@" --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE"
