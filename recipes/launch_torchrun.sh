#!/usr/bin/env bash
# Launch `lightning-ft fit` with torchrun on one node or several: run this script once on every node.
#
#   recipes/launch_torchrun.sh recipes/smollm2_mr_lora.yaml          # one node: every GPU, else one CPU process
#   NPROC_PER_NODE=2 STRATEGY=adapter_fsdp2 recipes/launch_torchrun.sh recipes/smollm2_mr_lora.yaml
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 recipes/launch_torchrun.sh recipes/smollm2_mr_lora.yaml   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 recipes/launch_torchrun.sh recipes/smollm2_mr_lora.yaml   # on node 1
#
# Settings (environment, default in brackets):
#   NNODES [1]              number of nodes: --trainer.num_nodes
#   NODE_RANK [0]           this node's index, 0 .. NNODES-1
#   NPROC_PER_NODE [GPUs]   processes on this node (the GPU count, else 1): --trainer.devices
#   MASTER_ADDR [127.0.0.1] address of node 0, reachable from every node; MASTER_PORT [29500] a free port there
#   STRATEGY [adapter_ddp]  adapter_ddp, adapter_fsdp2 or adapter_fsdp1 (GPUs only), see lightning_ft.strategies
#   PYTHON [python]         the interpreter with lightning-ft installed
# Arguments after the config go to `lightning-ft fit` (e.g. --trainer.max_steps 100). The global batch is
# data.batch_size x NPROC_PER_NODE x NNODES (x accumulate_grad_batches). torchrun sets the ranks; Lightning checks
# that num_nodes x devices equals the processes started. Checkpoints, logs and exports go to paths every node can
# reach in the same place (a shared file system): sharded checkpoints are written by every rank.
set -euo pipefail

CONFIG=${1:?"usage: launch_torchrun.sh CONFIG.yaml [lightning-ft fit arguments...]"}
shift
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
STRATEGY=${STRATEGY:-adapter_ddp}
# one thread per process unless told otherwise: processes x threads above the cores slows every rank down
CORES=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC_PER_NODE > 0 ? CORES / NPROC_PER_NODE : 1 ))}

exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
    -m lightning_ft.cli fit --config "$CONFIG" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" --trainer.strategy "$STRATEGY" "$@"
