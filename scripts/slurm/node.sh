#!/usr/bin/env bash
# Per-node entrypoint, started once per node by scripts/slurm/train.sbatch (srun); not meant to be run by hand:
#
#   srun --ntasks-per-node=1 scripts/slurm/node.sh +config=NAME run.dir=DIR
#
# Execs torchrun (PARD_LAUNCHER=torchrun, default) or `accelerate launch` (PARD_LAUNCHER=accelerate) for this node's
# NPROC_PER_NODE processes of `python -m pard_train`, with node rank SLURM_NODEID, SLURM_NNODES nodes and the
# MASTER_ADDR/MASTER_PORT exported by the sbatch script. PARD_DRY_RUN=1 prints the launcher command instead of running
# it (tests check it for 1 and 2 processes).
#
# Stopping: the trainers save a checkpoint on SIGTERM or USR1 and exit. torchrun (and `accelerate launch`, which runs
# torchrun's agent) forwards SIGTERM to its workers, then kills them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later
# (torch's default: 30, too short for a ZeRO checkpoint of a large model); here it is PARD_SHUTDOWN_TIMEOUT, default
# 600. SLURM's own SIGKILL follows its SIGTERM after the site's KillWait (preemption: GraceTime), so the reliable path
# is the early USR1 of train.sbatch (--signal=B:USR1@120), which does not depend on either.
set -euo pipefail

python=${PYTHON:-python}
nodes=${SLURM_NNODES:-1}
node_rank=${SLURM_NODEID:-0}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$python" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
export PYTHONUNBUFFERED=1
# A rank killed by a fatal signal (an abort or a segfault in a C++ library) prints every thread's Python stack first.
export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${PARD_SHUTDOWN_TIMEOUT:-600}
launch=()
[ "${PARD_DRY_RUN:-0}" = 1 ] && launch=(echo)
# The trainer handles USR1 (checkpoint, exit 0); the launcher must not die of it. Ignored signals stay ignored across
# exec; the trainer installs its own handler.
trap '' USR1

case "${PARD_LAUNCHER:-torchrun}" in
    torchrun)
        exec "${launch[@]}" "$python" -m torch.distributed.run --nnodes "$nodes" --node_rank "$node_rank" \
            --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
            -m pard_train "$@" ;;
    accelerate)
        # pard_train builds its own DeepSpeed plugin from deepspeed=...; accelerate only launches the processes.
        # On CPU nodes `--cpu` would start one process; ACCELERATE_USE_CPU keeps --multi_gpu's process count.
        "$python" -c 'import torch,sys; sys.exit(torch.cuda.is_available())' && export ACCELERATE_USE_CPU=true
        # --multi_gpu starts the distributed launcher; accelerate refuses it for one process in total.
        total=$((NPROC_PER_NODE * nodes))
        multi=()
        [ "$total" -gt 1 ] && multi=(--multi_gpu)
        exec "${launch[@]}" "$python" -m accelerate.commands.launch "${multi[@]}" --num_machines "$nodes" \
            --machine_rank "$node_rank" --num_processes "$total" \
            --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" -m pard_train "$@" ;;
    *)
        echo "node.sh: PARD_LAUNCHER=${PARD_LAUNCHER} is not torchrun or accelerate" >&2; exit 2 ;;
esac
