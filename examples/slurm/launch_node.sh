#!/bin/bash
# One node's part of examples/slurm/train.sbatch, run by srun on every node of the job:
#   launch_node.sh RECIPE.yaml [overrides...]   start this node's torchrun (its trainers)
#   launch_node.sh --signal SIG                 pass SIG to this job's trainers on this node only
set -euo pipefail

if [ "${1:-}" = --signal ]; then
  # The trainers are the children of this job's torchrun agent, found by the rendezvous id it was
  # given below (the job id); other jobs' trainers on this node are not touched.
  agents=$(pgrep -u "$(id -u)" -d, -f -- "-m torch.distributed.run .*--rdzv-id $SLURM_JOB_ID( |\$)") || true
  if [ -z "$agents" ] || ! pkill "-$2" -P "$agents"; then
    echo "[slurm] $SLURMD_NODENAME: no trainer of job $SLURM_JOB_ID running here to pass SIG$2 to"
  fi
  exit 0
fi
# Only the batch script's node reports how training ended (train.sbatch reads it there).
[ "$SLURMD_NODENAME" = "${PROLONG_BATCH_NODE:-}" ] || unset PROLONG_EXIT_STATUS_FILE

# Processes per node: the GPUs of this step, read inside it (with --exclusive the batch script
# sees all of the node's GPUs, the step only those requested). CPU nodes: NPROC_PER_NODE.
NPROC=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
if [ "$NPROC" -lt 1 ]; then
  echo "[slurm] error: no GPUs in this job step on $SLURMD_NODENAME; on CPU nodes submit with" \
       "--gpus-per-node=0 and NPROC_PER_NODE=<processes per node>" >&2
  exit 1
fi
echo "[slurm] $SLURMD_NODENAME: $NPROC processes (this step's GPUs: ${SLURM_GPUS_ON_NODE:-none}; NPROC_PER_NODE: ${NPROC_PER_NODE:-unset})"

# gloo (CPU runs; megatron's gloo groups on GPUs) listens on the address of this host's name.
# Where that is a loopback address (Debian's 127.0.1.1 in /etc/hosts) or nothing, the other
# nodes cannot reach it: use the interface of this node's route to another node of the job.
# NCCL finds a non-loopback interface itself; set NCCL_SOCKET_IFNAME to choose among several.
gloo_interface() {
  local own peer addr
  own=$(getent ahostsv4 "$(hostname)" | awk 'NR == 1 {print $1}') || true
  [[ $SLURM_NNODES -gt 1 && ( -z $own || $own == 127.* ) ]] || return 0
  peer=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | grep -vxF "$SLURMD_NODENAME" | head -n 1)
  addr=$(getent ahostsv4 "$peer" | awk 'NR == 1 {print $1}') || true
  [[ -n $addr && $addr != 127.* ]] || return 0
  ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p'
}
if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && iface=$(gloo_interface) && [ -n "$iface" ]; then
  export GLOO_SOCKET_IFNAME=$iface
  echo "[slurm] $SLURMD_NODENAME: $(hostname) resolves to a loopback address; GLOO_SOCKET_IFNAME=$iface" \
       "(the route to the other nodes; set it yourself to choose)"
fi

# torchrun's agent has no SIGUSR1 handler (the default action would kill it): it runs with USR1
# ignored; the trainers inherit that until they install their own handler.
trap '' USR1
exec "${PYTHON:-python3}" -m torch.distributed.run \
  --nnodes "$SLURM_NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" \
  pretrain_prolong.py --config "$@"
