#!/usr/bin/env bash
# Per-node entrypoint, started once per node by scripts/slurm/train.sbatch (srun); not meant to be run by hand:
#
#   srun --ntasks-per-node=1 scripts/slurm/node.sh +config=NAME run.dir=DIR
#
# Execs torchrun (PARD_LAUNCHER=torchrun, default) or `accelerate launch` (PARD_LAUNCHER=accelerate) for this node's
# NPROC_PER_NODE processes of `python -m pard_train`, with node rank SLURM_NODEID, SLURM_NNODES nodes and the
# MASTER_ADDR/MASTER_PORT exported by the sbatch script.
set -euo pipefail

python=${PYTHON:-python}
nodes=${SLURM_NNODES:-1}
node_rank=${SLURM_NODEID:-0}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$python" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
export PYTHONUNBUFFERED=1
# The trainer handles USR1 (checkpoint, exit 0); the launcher must not die of it. Ignored signals stay ignored across
# exec; the trainer installs its own handler.
trap '' USR1

case "${PARD_LAUNCHER:-torchrun}" in
    torchrun)
        exec "$python" -m torch.distributed.run --nnodes "$nodes" --node_rank "$node_rank" \
            --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
            -m pard_train "$@" ;;
    accelerate)
        # pard_train builds its own DeepSpeed plugin from deepspeed=...; accelerate only launches the processes.
        # On CPU nodes `--cpu` would start one process; ACCELERATE_USE_CPU keeps --multi_gpu's process count.
        "$python" -c 'import torch,sys; sys.exit(torch.cuda.is_available())' && export ACCELERATE_USE_CPU=true
        exec "$python" -m accelerate.commands.launch --multi_gpu --num_machines "$nodes" \
            --machine_rank "$node_rank" --num_processes $((NPROC_PER_NODE * nodes)) \
            --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" -m pard_train "$@" ;;
    *)
        echo "node.sh: PARD_LAUNCHER=${PARD_LAUNCHER} is not torchrun or accelerate" >&2; exit 2 ;;
esac
