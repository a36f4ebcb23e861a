#!/usr/bin/env bash
# The seed-training job for the central cluster: torchrun (DDP, env:// rendezvous) with the
# btm training loop, checkpoints on shared storage, resume after preemption (run the same
# command again), then the seed is uploaded and registered as the root of a forest, once.
#
# usage: deploy/seed_job.sh FOREST CORPUS OUT [elmforest seed options...]
#   env: NNODES (1), NPROC_PER_NODE (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
#        CHECKPOINT_EVERY (200), ELMFOREST_URL and ELMFOREST_TOKEN (a maintainer's token)
#        KIND=dense trains the compute-matched dense baseline instead and registers it as FOREST's baseline
set -euo pipefail
forest=$1 corpus=$2 out=$3
shift 3
kind=${KIND:-seed}
torchrun --nnodes "${NNODES:-1}" --nproc-per-node "${NPROC_PER_NODE:-1}" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  --no-python elmforest seed --corpus "$corpus" --out "$out" --kind "$kind" \
  --checkpoint-every "${CHECKPOINT_EVERY:-200}" --no-progress "$@"
if [ "${NODE_RANK:-0}" = 0 ]; then
  if [ "$kind" = dense ]; then
    elmforest register-baseline "$forest" dense "$out"
  else
    elmforest register-seed "$forest" "$out"
  fi
fi
