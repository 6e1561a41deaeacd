#!/usr/bin/env bash
# Launch ctxrq_jax training on GPUs: one host directly, or several nodes with SLURM.
#
# SLURM layout: ONE PROCESS PER NODE.  Each process drives all G GPUs of its node
# (JAX_LOCAL_DEVICE_IDS=0..G-1), so the data pipeline runs once per host.  This
# matters: JAX's own SLURM auto-detection assumes one process per GPU and would
# otherwise give each process only the GPU numbered SLURM_LOCALID.  The script
# exports JAX_COORDINATOR_ADDRESS (first host of SLURM_JOB_NODELIST),
# JAX_NUM_PROCESSES (= nodes) and, per task, JAX_PROCESS_ID (= SLURM_PROCID).
# Run with -h for usage.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<EOF
Usage: $PROG [options] SUBCOMMAND [options] [-- TRAINING ARGS...]

Subcommands
  local    run on this host; JAX sees all of its GPUs (or those of --gpus).  For a
           multi-node run without SLURM, start it on every node with --coordinator,
           --num-processes and --process-id.  It runs in this checkout, as the job
           does (--chdir): relative --config and --workdir paths are taken from there.
  slurm    write an sbatch script for N nodes x G GPUs (one process per node,
           started with srun) and submit it with sbatch

Common options (environment variable in brackets)
  -m, --module MOD         training module                   [CTXRQ_MODULE] (ctxrq_jax.train;
                           stage 1 is ctxrq_jax.train_rqvae)
      --python PY          Python interpreter                [CTXRQ_PYTHON] (python)
  -e, --env KEY=VALUE      extra environment for training (repeatable)
      --dry-run            print the commands (prefixed '+ ') and, for slurm, the
                           generated script, instead of running anything
  -h, --help               show this help

local
      --gpus LIST          CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3  (default: all)
      --coordinator H:P    JAX_COORDINATOR_ADDRESS (multi-node without SLURM)
      --num-processes N    JAX_NUM_PROCESSES
      --process-id I       JAX_PROCESS_ID

slurm
  -N, --nodes N            number of nodes                   [CTXRQ_SLURM_NODES] (1)
  -G, --gpus-per-node G    GPUs per node                     [CTXRQ_SLURM_GPUS_PER_NODE] (8)
  -c, --cpus-per-task C    CPUs per node process             [CTXRQ_SLURM_CPUS_PER_TASK] (32)
      --time T             wall-clock limit                  [CTXRQ_SLURM_TIME] (48:00:00)
      --signal-s S         SIGTERM the training processes S seconds before the
                           limit, so they save a checkpoint and stop in time
                           (SLURM's own SIGTERM comes at the limit, ~30 s before
                           the kill); 0: none                [CTXRQ_SLURM_SIGNAL_S] (300)
      --partition P        partition                         [CTXRQ_SLURM_PARTITION]
      --account A          account                           [CTXRQ_SLURM_ACCOUNT]
      --job-name J         job name                          (ctxrq)
      --output PATTERN     log file pattern                  (slurm-%x-%j.out)
      --chdir DIR          working directory of the job      (this checkout)
      --port P             coordinator port                  (20000 + job id % 10000)
      --setup CMD          shell command run first in the job, e.g.
                           'source ~/venvs/ctxrq/bin/activate' or 'module load cuda'
      --save-script FILE   also write the generated script to FILE

Training arguments: everything after '--' goes to the training module verbatim;
--config=..., --config.KEY=..., and --workdir=... are also passed through
without the '--'.  For SLURM the workdir must be on a shared filesystem (or gs://).

Examples
  $PROG local --config=configs/imagenet.py:821m --workdir=/ckpt/821m \\
      --config.data.codes_dir=/data/imagenet_codes --config.data.stage1_dir=/ckpt/rqvae/rqvae
  $PROG slurm -N 4 -G 8 --partition gpu --setup 'source .venv/bin/activate' \\
      --config=configs/imagenet.py:821m --workdir=/shared/ckpt/821m \\
      --config.data.codes_dir=/shared/imagenet_codes --config.data.stage1_dir=/shared/ckpt/rqvae/rqvae
  $PROG slurm -N 2 -G 4 -m ctxrq_jax.train_rqvae --dry-run \\
      -- --config=configs/rqvae_imagenet.py --workdir=/shared/ckpt/rqvae
EOF
}

# ---------------------------------------------------------------- options
MODULE=${CTXRQ_MODULE:-ctxrq_jax.train}
PYTHON=${CTXRQ_PYTHON:-python}
GPUS=""
COORDINATOR=""
NUM_PROCESSES=""
PROCESS_ID=""
NODES=${CTXRQ_SLURM_NODES:-1}
GPUS_PER_NODE=${CTXRQ_SLURM_GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CTXRQ_SLURM_CPUS_PER_TASK:-32}
TIME=${CTXRQ_SLURM_TIME:-48:00:00}
SIGNAL_S=${CTXRQ_SLURM_SIGNAL_S:-300}
PARTITION=${CTXRQ_SLURM_PARTITION:-}
ACCOUNT=${CTXRQ_SLURM_ACCOUNT:-}
JOB_NAME=ctxrq
OUTPUT='slurm-%x-%j.out'
CHDIR=$REPO_ROOT
PORT=""
SETUP=""
SAVE_SCRIPT=""
DRY_RUN=0
CMD=""
ENVS=()
TRAIN_ARGS=()

# This script's options; the rest are parsed by parse_args in common.sh.
parse_option() {
  case $1 in
    --gpus) need_value "$1" $# "${2:-}"; GPUS=$2; OPT_SHIFT=2 ;;
    --coordinator) need_value "$1" $# "${2:-}"; COORDINATOR=$2; OPT_SHIFT=2 ;;
    --num-processes) need_value "$1" $# "${2:-}"; NUM_PROCESSES=$2; OPT_SHIFT=2 ;;
    --process-id) need_value "$1" $# "${2:-}"; PROCESS_ID=$2; OPT_SHIFT=2 ;;
    -N|--nodes) need_value "$1" $# "${2:-}"; NODES=$2; OPT_SHIFT=2 ;;
    -G|--gpus-per-node) need_value "$1" $# "${2:-}"; GPUS_PER_NODE=$2; OPT_SHIFT=2 ;;
    -c|--cpus-per-task) need_value "$1" $# "${2:-}"; CPUS_PER_TASK=$2; OPT_SHIFT=2 ;;
    --time) need_value "$1" $# "${2:-}"; TIME=$2; OPT_SHIFT=2 ;;
    --signal-s) need_value "$1" $# "${2:-}"; SIGNAL_S=$2; OPT_SHIFT=2 ;;
    --partition) need_value "$1" $# "${2:-}"; PARTITION=$2; OPT_SHIFT=2 ;;
    --account) need_value "$1" $# "${2:-}"; ACCOUNT=$2; OPT_SHIFT=2 ;;
    --job-name) need_value "$1" $# "${2:-}"; JOB_NAME=$2; OPT_SHIFT=2 ;;
    --output) need_value "$1" $# "${2:-}"; OUTPUT=$2; OPT_SHIFT=2 ;;
    --chdir) need_value "$1" $# "${2:-}"; CHDIR=$2; OPT_SHIFT=2 ;;
    --port) need_value "$1" $# "${2:-}"; PORT=$2; OPT_SHIFT=2 ;;
    --setup) need_value "$1" $# "${2:-}"; SETUP=$2; OPT_SHIFT=2 ;;
    --save-script) need_value "$1" $# "${2:-}"; SAVE_SCRIPT=$2; OPT_SHIFT=2 ;;
  esac
}

parse_args "$@"
check_subcommand local slurm
check_module_and_envs
if [[ ${#TRAIN_ARGS[@]} -eq 0 ]]; then
  echo "$PROG: warning: no training arguments (e.g. --config=configs/imagenet.py:821m --workdir=...)" >&2
fi

# ---------------------------------------------------------------- local
# Whether --env gave variable $1.
has_env() {
  local kv
  for kv in "${ENVS[@]+"${ENVS[@]}"}"; do
    [[ ${kv%%=*} == "$1" ]] && return 0
  done
  return 1
}

do_local() {
  [[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus expects a list like 0,1,2,3, got '$GPUS'"
  local envs=("${ENVS[@]+"${ENVS[@]}"}")
  [[ -n $GPUS ]] && envs+=("CUDA_VISIBLE_DEVICES=$GPUS")
  if [[ -n $COORDINATOR || -n $NUM_PROCESSES || -n $PROCESS_ID ]]; then
    [[ -n $COORDINATOR && -n $NUM_PROCESSES && -n $PROCESS_ID ]] ||
      die "multi-node needs all of --coordinator, --num-processes and --process-id"
    [[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer"
    [[ $PROCESS_ID =~ ^[0-9]+$ && $PROCESS_ID -lt $NUM_PROCESSES ]] ||
      die "--process-id must be in [0, $NUM_PROCESSES)"
    envs+=("JAX_COORDINATOR_ADDRESS=$COORDINATOR" "JAX_NUM_PROCESSES=$NUM_PROCESSES"
           "JAX_PROCESS_ID=$PROCESS_ID")
    # Inside a SLURM allocation JAX's SLURM detection would give this process only the GPU numbered SLURM_LOCALID
    # (one process per GPU); this process drives all of its node's GPUs, so they are named, as the slurm batch
    # script names them (--env JAX_LOCAL_DEVICE_IDS=... chooses others).
    if [[ -n ${SLURM_JOB_ID:-} && -z ${JAX_LOCAL_DEVICE_IDS:-} ]] && ! has_env JAX_LOCAL_DEVICE_IDS; then
      local visible=${GPUS:-${CUDA_VISIBLE_DEVICES:-}} count
      if [[ -n $visible ]]; then
        count=$(($(tr -cd , <<<"$visible" | wc -c) + 1))
      elif command -v nvidia-smi >/dev/null; then
        count=$(nvidia-smi -L | grep -c '^GPU ' || true)  # grep -c exits 1 when it counts none
      else
        die "inside a SLURM allocation JAX would give this process only GPU \$SLURM_LOCALID; name the GPUs with --gpus"
      fi
      ((count > 0)) || die "no GPU found (nvidia-smi -L lists none); name them with --gpus"
      envs+=("JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((count - 1)))")
    fi
  fi
  local cmd=()
  [[ ${#envs[@]} -gt 0 ]] && cmd+=(env "${envs[@]}")
  cmd+=("$PYTHON" -m "$MODULE" "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(shjoin "${cmd[@]}")"
  else
    printf '+ %s\n' "$(shjoin "${cmd[@]}")" >&2
    cd "$REPO_ROOT"
    exec "${cmd[@]}"
  fi
}

# ---------------------------------------------------------------- slurm
slurm_script() {
  local device_ids i
  device_ids=0
  for ((i = 1; i < GPUS_PER_NODE; i++)); do
    device_ids+=",$i"
  done
  # Evaluated inside the job, where SLURM_JOB_ID is set.
  # shellcheck disable=SC2016
  local port_expr=${PORT:-'$((20000 + SLURM_JOB_ID % 10000))'}
  local train
  train=$(shjoin "$PYTHON" -m "$MODULE" "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")

  echo "#!/bin/bash"
  echo "# Generated by launch/gpu.sh: $NODES node(s) x $GPUS_PER_NODE GPU(s), one JAX process per node."
  echo "#SBATCH --job-name=$(shquote "$JOB_NAME")"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
  echo "#SBATCH --time=$TIME"
  echo "#SBATCH --output=$OUTPUT"
  echo "#SBATCH --chdir=$CHDIR"
  # The job's steps (srun's tasks: the training processes) get SIGTERM this long before the time limit.
  ((SIGNAL_S > 0)) && echo "#SBATCH --signal=TERM@$SIGNAL_S"
  [[ -n $PARTITION ]] && echo "#SBATCH --partition=$PARTITION"
  [[ -n $ACCOUNT ]] && echo "#SBATCH --account=$ACCOUNT"
  echo "set -euo pipefail"
  [[ -n $SETUP ]] && printf '%s\n' "$SETUP"
  local kv
  for kv in "${ENVS[@]+"${ENVS[@]}"}"; do
    echo "export $(shquote "$kv")"
  done
  cat <<EOF
# The coordinator is the first host of the allocation; every node runs one process.
head_node=\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)
export JAX_COORDINATOR_ADDRESS="\$head_node:$port_expr"
export JAX_NUM_PROCESSES=$NODES
export JAX_LOCAL_DEVICE_IDS=$device_ids
echo "coordinator \$JAX_COORDINATOR_ADDRESS, \$JAX_NUM_PROCESSES process(es) x $GPUS_PER_NODE GPU(s)"
# Each task sets its own JAX_PROCESS_ID from SLURM_PROCID (single quotes on purpose).
# shellcheck disable=SC2016
srun --nodes=$NODES --ntasks-per-node=1 --gpus-per-node=$GPUS_PER_NODE --cpus-per-task=$CPUS_PER_TASK --kill-on-bad-exit=1 \\
  bash -c 'export JAX_PROCESS_ID=\$SLURM_PROCID; exec "\$@"' ctxrq-task \\
  $train
EOF
}

do_slurm() {
  [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
  [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS_PER_NODE'"
  [[ $CPUS_PER_TASK =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task must be a positive integer, got '$CPUS_PER_TASK'"
  [[ -z $PORT || $PORT =~ ^[1-9][0-9]*$ ]] || die "--port must be a number, got '$PORT'"
  [[ $TIME =~ ^[0-9:-]+$ ]] || die "--time looks wrong: '$TIME'"
  [[ $SIGNAL_S =~ ^[0-9]+$ && $SIGNAL_S -le 65535 ]] ||
    die "--signal-s must be a number of seconds in [0, 65535], got '$SIGNAL_S'"
  [[ $CHDIR =~ ^[A-Za-z0-9_./+-]+$ ]] || die "--chdir must be a plain path, got '$CHDIR'"
  [[ $OUTPUT =~ ^[A-Za-z0-9_./%+-]+$ ]] || die "--output must be a plain path pattern, got '$OUTPUT'"
  local word
  for word in "$JOB_NAME" "$PARTITION" "$ACCOUNT"; do
    [[ $word =~ ^[A-Za-z0-9_.,+-]*$ ]] || die "job name, partition and account must be plain words, got '$word'"
  done
  local script
  script=$(slurm_script)
  if [[ -n $SAVE_SCRIPT ]]; then
    if [[ $DRY_RUN == 1 ]]; then
      echo "# (dry run: not writing $SAVE_SCRIPT)"
    else
      printf '%s\n' "$script" > "$SAVE_SCRIPT"
      echo "$PROG: wrote $SAVE_SCRIPT" >&2
    fi
  fi
  if [[ $DRY_RUN == 1 ]]; then
    echo "# ----- generated sbatch script -----"
    printf '%s\n' "$script"
    echo "# ----- end of script -----"
    echo "+ sbatch  # script on stdin"
  else
    command -v sbatch >/dev/null || die "sbatch not found (run this on a SLURM login node)"
    echo "+ sbatch  # script on stdin" >&2
    printf '%s\n' "$script" | sbatch
  fi
}

case $CMD in
  local) do_local ;;
  slurm) do_slurm ;;
esac
