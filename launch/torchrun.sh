#!/bin/bash
# One training stage on several nodes with torchrun, without SLURM. Start it on EVERY node, from
# the project folder (on a filesystem all nodes share), with the same arguments:
#
#   RUN_ID=pre1 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh pretrain conservative  # node0
#   RUN_ID=pre1 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh pretrain conservative  # node1
#
# then, after fetch, preprocess and init_scratch ran once (`dvc repro preprocess init_scratch`),
# the same for `finetune scratch` and `finetune <aug>`, and `dvc repro evaluate` at the end.
# Nodes and GPUs per node come from params.yaml (<stage>.trainer.num_nodes and .devices), so
# torchrun and Lightning cannot disagree about the world size. Node 0 records the result in
# dvc.lock (`dvc commit`), as if `dvc repro` had run the stage (README, "Full scale").

set -euo pipefail

STAGE=${1:?usage: launch/torchrun.sh pretrain|finetune <preset or encoder name>}
ITEM=${2:?usage: launch/torchrun.sh pretrain|finetune <preset or encoder name>}
case "$STAGE" in
    pretrain | finetune) ;;
    # The other stages are one process each: dvc repro runs them.
    *) echo "launch/torchrun.sh: $STAGE is not distributed; run: dvc repro $STAGE" >&2; exit 2 ;;
esac
: "${NODE_RANK:?set NODE_RANK: 0 on the first node, 1, 2, ... on the others}"
: "${MASTER_ADDR:?set MASTER_ADDR: the host name of the node with NODE_RANK=0}"
# Names this launch on every node, so rank 0 alone lists the pretraining images and decides
# whether to resume, and the other ranks take its decision (a new word for each launch).
: "${RUN_ID:?set RUN_ID: the same new word on every node, for each launch (e.g. pre1)}"
MASTER_PORT=${MASTER_PORT:-29500}  # a free TCP port on that node, the same on every node

. .venv/bin/activate

# devices and num_nodes of this stage's trainer section, read through the config loader.
read -r NPROC NNODES < <(python -c "
from depthpipe.config import load_params
t = getattr(load_params(), '$STAGE').trainer
print(t.devices, t.num_nodes)")

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # per process; torchrun would otherwise pick 1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}          # INFO to see the chosen network when it hangs
# 1 (TearDown): on an NCCL error or timeout (a rank died), abort the NCCL communicators and end
# the process instead of the other ranks waiting in an all-reduce. PyTorch's default is 3
# (SkipCleanUp: end the process without aborting the communicators); 2 (CleanUpOnly) aborts
# them without ending the process. (torch's ProcessGroupNCCL.hpp)
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# export NCCL_SOCKET_IFNAME=ib0                # site-specific: the interface NCCL should use
export PYTHONUNBUFFERED=1

# Static rendezvous with an explicit node rank: node 0's first process is global rank 0, the
# one that writes the stage's outputs, so node 0 is also the one that commits them below.
# No --max-restarts: a restarted worker would rejoin a half-finished run; rerunning the script
# resumes pretraining from its checkpoint instead. RUN_ID (above) becomes the rendezvous id.
# Global rank 0 holds the project's leader lock while the stage runs.
torchrun \
    --nnodes "$NNODES" \
    --nproc-per-node "$NPROC" \
    --node-rank "$NODE_RANK" \
    --rdzv-backend static \
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "depthpipe-$RUN_ID" \
    -m "depthpipe.stages.$STAGE" "$ITEM"

if [ "$NODE_RANK" = 0 ]; then
    # Reached only when torchrun succeeded (set -e): a stage ended by an error or SIGTERM exits
    # non-zero and leaves no outputs. -f: no confirmation prompt; DVC hashes what rank 0 wrote.
    # Then, recorded, the working folder (the resume point) may go. Both holding the project's
    # leader lock: no other leader's stage writes between the commit and the prune.
    python -m depthpipe.distributed hold -- bash -c \
        'dvc commit --force "$1" && python -m depthpipe.distributed prune "$1"' _ "$STAGE@$ITEM"
fi
