#!/usr/bin/env bash
# Launch ctxrq_jax training on a Cloud TPU VM slice (single- or multi-host).
#
# Every worker of the slice runs the same command (gcloud ... ssh --worker=all);
# jax.distributed.initialize() inside the program auto-detects the TPU pod, so
# nothing else has to be exported.  Run with -h for usage.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
DEFAULT_REPO=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<EOF
Usage: $PROG [options] SUBCOMMAND [options] [-- TRAINING ARGS...]

Subcommands
  create   create the TPU VM slice (or a queued resource with --queued)
  setup    copy/clone the project to every worker and pip install -e '.[tpu]'
  train    run the training module on all workers (--worker=all), streaming logs
  logs     show/follow the training log of one worker (or --worker=all)
  delete   delete the slice; needs --yes, or a "y" at an interactive prompt
  all      create + setup + train

Options (environment variable in brackets)
  -n, --name NAME          TPU (and queued-resource) name        [TPU_NAME]  required
  -z, --zone ZONE          zone, e.g. us-central2-b              [TPU_ZONE]  required
  -p, --project PROJECT    GCP project (default: gcloud config)  [TPU_PROJECT]
  -t, --accelerator-type T slice type, e.g. v4-8, v4-32, v5p-64  [TPU_TYPE]    (v4-32)
  -v, --version V          TPU runtime/software version          [TPU_VERSION]
                           (default by type: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                            v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
      --spot               create Spot VMs                       [TPU_SPOT=1]
      --preemptible        create preemptible VMs                [TPU_PREEMPTIBLE=1]
      --queued             create/delete through 'queued-resources' and, for 'all',
                           wait until the request is ACTIVE      [TPU_QUEUED=1]
                           (polled every TPU_POLL_S seconds (30); TPU_POLL_RETRIES (10)
                            failed polls in a row end the wait)
  -r, --repo SRC           project source: a local directory (packed with tar and
                           scp'd) or a git URL (cloned on each worker)
                                                                 [CTXRQ_REPO]  (this checkout)
      --ref REF            git branch/tag/commit for a git --repo [CTXRQ_REF]  (HEAD)
      --remote-dir DIR     project directory on the workers      [CTXRQ_REMOTE_DIR] (~/ctxrq_jax)
      --venv DIR           virtualenv on the workers             [CTXRQ_VENV] (~/ctxrq_venv)
      --python PY          interpreter that creates the venv (>=3.11; installed with
                           apt-get when missing)                 [CTXRQ_PYTHON] (python3.11)
  -m, --module MOD         training module                      [CTXRQ_MODULE] (ctxrq_jax.train;
                           stage 1 is ctxrq_jax.train_rqvae)
  -e, --env KEY=VALUE      extra environment for training (repeatable), e.g.
                           TFDS_DATA_DIR=gs://bucket/tfds
      --log FILE           log file on each worker               [CTXRQ_LOG] (~/ctxrq_train.log)
      --detach             train: start in the background (nohup) and return; follow
                           the run with '$PROG logs'
  -w, --worker W           logs: worker index or 'all'           (0)
      --lines N            logs: lines of history before following (100)
  -y, --yes                do not ask before deleting
      --dry-run            print every command (prefixed '+ ') instead of running it
  -h, --help               show this help

Training arguments: everything after '--' goes to the training module verbatim;
--config=..., --config.KEY=..., and --workdir=... are also passed through
without the '--'.  On a multi-host slice (more than 8 TensorCores or chips,
e.g. v4-16, v5p-16, v5litepod-16) train and all refuse a --workdir that is not
gs://: every host writes its checkpoint shards there (train checks it only when
-t or TPU_TYPE gives the slice's type).  Put the code dataset
(--config.data.codes_dir), the stage-1 artifact (--config.data.stage1_dir) and
TFDS_DATA_DIR in the bucket too, so that every host reads the same files.

Examples
  $PROG all --name ctxrq --zone us-central2-b -t v4-32 --spot \\
      --config=configs/imagenet.py:821m --workdir=gs://BUCKET/ctxrq/821m \\
      --config.data.codes_dir=gs://BUCKET/imagenet_codes --config.data.stage1_dir=gs://BUCKET/rqvae/rqvae
  $PROG train -n ctxrq -z us-central2-b -m ctxrq_jax.train_rqvae --detach \\
      -- --config=configs/rqvae_imagenet.py --workdir=gs://BUCKET/rqvae
  $PROG logs -n ctxrq -z us-central2-b
  $PROG delete -n ctxrq -z us-central2-b --yes
EOF
}

# Run a command, or only print it with --dry-run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(shjoin "$@")"
  else
    printf '+ %s\n' "$(shjoin "$@")" >&2
    "$@"
  fi
}

# Remote paths are spliced into remote shell commands unquoted (so that ~ expands).
check_remote_path() {
  [[ $2 =~ ^[A-Za-z0-9_./~+-]+$ ]] || die "$1 must be a plain path (letters, digits, _ . / ~ + -), got '$2'"
}

# ---------------------------------------------------------------- options
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
ACCEL=${TPU_TYPE:-v4-32}
ACCEL_GIVEN=${TPU_TYPE:+1}  # `train` on an existing slice knows its type only when told
VERSION=${TPU_VERSION:-}
SPOT=${TPU_SPOT:-0}
PREEMPTIBLE=${TPU_PREEMPTIBLE:-0}
QUEUED=${TPU_QUEUED:-0}
POLL_S=${TPU_POLL_S:-30}
POLL_RETRIES=${TPU_POLL_RETRIES:-10}
REPO=${CTXRQ_REPO:-$DEFAULT_REPO}
REF=${CTXRQ_REF:-HEAD}
# '~' stays literal here: it is expanded by the shell on the workers.
# shellcheck disable=SC2088
REMOTE_DIR=${CTXRQ_REMOTE_DIR:-'~/ctxrq_jax'}
# shellcheck disable=SC2088
VENV=${CTXRQ_VENV:-'~/ctxrq_venv'}
PYTHON=${CTXRQ_PYTHON:-python3.11}
MODULE=${CTXRQ_MODULE:-ctxrq_jax.train}
# shellcheck disable=SC2088
LOG=${CTXRQ_LOG:-'~/ctxrq_train.log'}
DETACH=0
WORKER=0
LINES=100
YES=0
DRY_RUN=0
CMD=""
ENVS=()
TRAIN_ARGS=()

# This script's options; the rest are parsed by parse_args in common.sh.
parse_option() {
  case $1 in
    -n|--name) need_value "$1" $# "${2:-}"; NAME=$2; OPT_SHIFT=2 ;;
    -z|--zone) need_value "$1" $# "${2:-}"; ZONE=$2; OPT_SHIFT=2 ;;
    -p|--project) need_value "$1" $# "${2:-}"; PROJECT=$2; OPT_SHIFT=2 ;;
    -t|--accelerator-type|--type) need_value "$1" $# "${2:-}"; ACCEL=$2; ACCEL_GIVEN=1; OPT_SHIFT=2 ;;
    -v|--version|--runtime-version) need_value "$1" $# "${2:-}"; VERSION=$2; OPT_SHIFT=2 ;;
    --spot) SPOT=1; OPT_SHIFT=1 ;;
    --preemptible) PREEMPTIBLE=1; OPT_SHIFT=1 ;;
    --queued) QUEUED=1; OPT_SHIFT=1 ;;
    -r|--repo) need_value "$1" $# "${2:-}"; REPO=$2; OPT_SHIFT=2 ;;
    --ref) need_value "$1" $# "${2:-}"; REF=$2; OPT_SHIFT=2 ;;
    --remote-dir) need_value "$1" $# "${2:-}"; REMOTE_DIR=$2; OPT_SHIFT=2 ;;
    --venv) need_value "$1" $# "${2:-}"; VENV=$2; OPT_SHIFT=2 ;;
    --log) need_value "$1" $# "${2:-}"; LOG=$2; OPT_SHIFT=2 ;;
    --detach) DETACH=1; OPT_SHIFT=1 ;;
    -w|--worker) need_value "$1" $# "${2:-}"; WORKER=$2; OPT_SHIFT=2 ;;
    --lines) need_value "$1" $# "${2:-}"; LINES=$2; OPT_SHIFT=2 ;;
    -y|--yes) YES=1; OPT_SHIFT=1 ;;
  esac
}

# A slice of more than 8 TensorCores (v2/v3/v4/v5p) or chips (v5e/v6e) spans several hosts.
is_multi_host() {
  local n=${ACCEL##*-}
  [[ $n =~ ^[0-9]+$ ]] && ((n > 8))
}

# The value of --workdir among the training arguments (the last one wins), or nothing.
train_workdir() {
  local a out="" next=0
  for a in "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}"; do
    if [[ $next == 1 ]]; then
      out=$a
      next=0
      continue
    fi
    case $a in
      --workdir=*) out=${a#--workdir=} ;;
      --workdir) next=1 ;;
    esac
  done
  printf '%s' "$out"
}

# On several hosts the workdir must be a bucket: each host writes its checkpoint shards and iterator state there,
# orbax's commit waits for all of them, and a restarted slice reads them back. `all` creates a slice of type ACCEL;
# `train` runs on an existing one, whose type is known only from -t / TPU_TYPE (without them nothing is refused).
check_workdir() {
  local workdir
  [[ $CMD == all || -n ${ACCEL_GIVEN:-} ]] || return 0
  is_multi_host || return 0
  workdir=$(train_workdir)
  if [[ -n $workdir && $workdir != gs://* ]]; then
    die "a multi-host slice ($ACCEL) needs --workdir=gs://BUCKET/...: '$workdir' would be a separate local directory on every host, and their checkpoints would never be complete"
  fi
}

parse_args "$@"
check_subcommand create setup train logs delete all
[[ -n $NAME ]] || die "missing TPU name (--name or TPU_NAME)"
[[ -n $ZONE ]] || die "missing zone (--zone or TPU_ZONE)"
[[ $SPOT == 1 && $PREEMPTIBLE == 1 ]] && die "--spot and --preemptible are mutually exclusive"
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a number or 'all', got '$WORKER'"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$LINES'"
[[ $POLL_S =~ ^[0-9]+$ ]] || die "TPU_POLL_S must be a number of seconds, got '$POLL_S'"
[[ $POLL_RETRIES =~ ^[1-9][0-9]*$ ]] || die "TPU_POLL_RETRIES must be a number >= 1, got '$POLL_RETRIES'"
check_module_and_envs
[[ $CMD == train || $CMD == all ]] && check_workdir
check_remote_path --remote-dir "$REMOTE_DIR"
check_remote_path --venv "$VENV"
check_remote_path --log "$LOG"
check_remote_path --python "$PYTHON"

if [[ -z $VERSION ]]; then
  case $ACCEL in
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi

# Flags shared by every gcloud call.
GFLAGS=("--zone=$ZONE")
[[ -n $PROJECT ]] && GFLAGS+=("--project=$PROJECT")

is_git_url() {
  [[ $1 == *://* || $1 == git@* || $1 == *.git ]]
}

# Run REMOTE_COMMAND on the given worker(s) of the slice.
tpu_ssh() {  # tpu_ssh WORKER REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" "--worker=$1" "--command=$2"
}

# ---------------------------------------------------------------- subcommands
do_create() {
  local extra=()
  [[ $SPOT == 1 ]] && extra+=(--spot)
  [[ $PREEMPTIBLE == 1 ]] && extra+=(--preemptible)
  if [[ $QUEUED == 1 ]]; then
    [[ $PREEMPTIBLE == 1 ]] && die "--preemptible is not available with --queued (use --spot)"
    run gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME" "${GFLAGS[@]}" \
      "--accelerator-type=$ACCEL" "--runtime-version=$VERSION" "${extra[@]+"${extra[@]}"}"
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${GFLAGS[@]}" \
      "--accelerator-type=$ACCEL" "--version=$VERSION" "${extra[@]+"${extra[@]}"}"
  fi
}

# A queued resource is only usable once it is ACTIVE. The wait can take hours: a describe call that fails (a network
# blip, an API quota) is retried, and only $POLL_RETRIES failures in a row end it, naming how to carry on.
wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$NAME" "${GFLAGS[@]}" "--format=value(state.state)")
  if [[ $DRY_RUN == 1 ]]; then
    run "${describe[@]}"
    return
  fi
  local state failures=0
  while true; do
    if state=$("${describe[@]}"); then
      failures=0
      echo "$PROG: queued resource $NAME is ${state:-UNKNOWN}" >&2
      case $state in
        ACTIVE) return ;;
        FAILED|SUSPENDED|SUSPENDING) die "queued resource $NAME is $state" ;;
      esac
    else
      failures=$((failures + 1))
      ((failures < POLL_RETRIES)) || die "could not read the state of queued resource $NAME ($failures describe" \
        "calls failed in a row); the request stands: once it is ACTIVE, run '$PROG setup' and '$PROG train'"
      echo "$PROG: describing queued resource $NAME failed ($failures in a row); trying again" >&2
    fi
    sleep "$POLL_S"
  done
}

do_setup() {
  # The remote script is a ';'-separated sequence run under 'set -eu', so the
  # first failing step stops it on that worker.
  local steps=("set -eu")
  if is_git_url "$REPO"; then
    steps+=("[ -d $REMOTE_DIR/.git ] || git clone --depth 1 $(shquote "$REPO") $REMOTE_DIR")
    steps+=("git -C $REMOTE_DIR fetch --depth 1 origin $(shquote "$REF")")
    steps+=("git -C $REMOTE_DIR checkout --force FETCH_HEAD")
  else
    [[ -d $REPO ]] || die "--repo '$REPO' is neither a directory nor a git URL"
    [[ -f $REPO/pyproject.toml ]] || die "--repo '$REPO' has no pyproject.toml"
    local tarball
    if [[ $DRY_RUN == 1 ]]; then
      tarball=${TMPDIR:-/tmp}/ctxrq_jax_src.tar.gz
    else
      tarball=$(mktemp "${TMPDIR:-/tmp}/ctxrq_jax_src.XXXXXX")
      # shellcheck disable=SC2064  # expand now: the path is fixed
      trap "rm -f '$tarball'" EXIT
    fi
    # Not the local runs (the checkout's .gitignore'd /runs/, /workdir*/, /build/): unpacked on a worker they would
    # overwrite its own run of the same name.
    run tar -czf "$tarball" -C "$REPO" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=.venv --exclude=venv --exclude=.pytest_cache --exclude=.mypy_cache \
      --exclude=./runs --exclude='./workdir*' --exclude=./build .
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:ctxrq_jax_src.tar.gz" "${GFLAGS[@]}" --worker=all
    steps+=("mkdir -p $REMOTE_DIR")
    steps+=("tar -xzf ~/ctxrq_jax_src.tar.gz -C $REMOTE_DIR")
    steps+=("rm -f ~/ctxrq_jax_src.tar.gz")
  fi
  local apt="sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600"
  steps+=("command -v $PYTHON >/dev/null || { $apt update -q && $apt install -y -q $PYTHON $PYTHON-venv; }")
  steps+=("[ -x $VENV/bin/python ] || $PYTHON -m venv $VENV")
  steps+=("$VENV/bin/pip install -q -U pip")
  steps+=("cd $REMOTE_DIR")
  steps+=("$VENV/bin/pip install -e '.[tpu]'")
  local script
  script=$(printf '%s; ' "${steps[@]}")
  tpu_ssh all "${script%; }"
}

train_command() {
  local envs="" args
  # Every worker joins the job (jax.distributed.initialize() finds the slice's hosts in the TPU VM's metadata; a
  # TPU VM sets no variable that says it is one host of several). A --env CTXRQ_DISTRIBUTED=... given later wins.
  envs="env CTXRQ_DISTRIBUTED=1 "
  if [[ ${#ENVS[@]} -gt 0 ]]; then
    envs="env CTXRQ_DISTRIBUTED=1 $(shjoin "${ENVS[@]}") "
  fi
  args=$(shjoin "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
  local full="cd $REMOTE_DIR && $envs$VENV/bin/python -m $MODULE${args:+ $args}"
  if [[ $DETACH == 1 ]]; then
    # Ignored SIGHUP survives exec, so the run outlives the ssh session.
    printf '%s' "(trap '' HUP; $full) >> $LOG 2>&1 < /dev/null & echo \"started on \$(hostname), log: $LOG\""
  else
    printf '%s' "set -o pipefail; $full 2>&1 | tee -a $LOG"
  fi
}

do_train() {
  if [[ ${#TRAIN_ARGS[@]} -eq 0 ]]; then
    echo "$PROG: warning: no training arguments (e.g. --config=configs/imagenet.py:821m --workdir=gs://...)" >&2
  fi
  tpu_ssh all "$(train_command)"
}

do_logs() {
  tpu_ssh "$WORKER" "tail -n $LINES -F $LOG"
}

do_delete() {
  if [[ $YES != 1 ]]; then
    if [[ -t 0 ]]; then
      local answer
      read -r -p "Delete TPU '$NAME' in zone '$ZONE'? [y/N] " answer
      [[ $answer == y || $answer == Y || $answer == yes ]] || { echo "$PROG: not deleting." >&2; exit 1; }
    else
      echo "$PROG: error: refusing to delete '$NAME' without --yes (stdin is not a terminal)" >&2
      exit 1
    fi
  fi
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${GFLAGS[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GFLAGS[@]}" --quiet
  fi
}

case $CMD in
  create) do_create ;;
  setup) do_setup ;;
  train) do_train ;;
  logs) do_logs ;;
  delete) do_delete ;;
  all)
    do_create
    [[ $QUEUED == 1 ]] && wait_active
    do_setup
    do_train
    ;;
esac
