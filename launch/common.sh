# shellcheck shell=bash
# Helpers shared by launch/gpu.sh and launch/tpu.sh; sourced, not run.
#
# The sourcing script defines PROG and usage(), sets the variables that the
# shared options fill (MODULE, PYTHON, DRY_RUN, CMD, ENVS, TRAIN_ARGS), and
# defines parse_option() for its own options (see parse_args).

die() {
  echo "$PROG: error: $*" >&2
  echo "Try '$PROG -h' for usage." >&2
  exit 2
}

# Quote one word for a POSIX shell; plain words stay unquoted.
shquote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quote all arguments, separated by spaces.
shjoin() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(shquote "$a")"
  done
  printf '%s' "$out"
}

need_value() {  # need_value OPTION NUM_REMAINING NEXT
  if [[ $2 -lt 2 || -z $3 || $3 == --* ]]; then
    die "option $1 requires a value"
  fi
}

# parse_args ARGS...: the command line.  Handles -h, --dry-run, -m, --python, -e,
# the training arguments and the subcommand word; every other option goes to the
# script's `parse_option OPTION [WORDS...]`, which sets OPT_SHIFT to the number of
# words it consumed and leaves it at 0 for an option it does not know.
# shellcheck disable=SC2034  # PYTHON and DRY_RUN are read by the sourcing script
parse_args() {
  local arg opt val
  while [[ $# -gt 0 ]]; do
    arg=$1
    # Split --opt=value (but not pass-through flags, handled below).
    if [[ $arg == --*=* && $arg != --config* && $arg != --workdir* ]]; then
      opt=${arg%%=*}
      val=${arg#*=}
      [[ -n $val ]] || die "option $opt requires a value"
      shift
      set -- "$opt" "$val" "$@"
      arg=$opt
    fi
    case $arg in
      -h|--help) usage; exit 0 ;;
      -m|--module) need_value "$arg" $# "${2:-}"; MODULE=$2; shift 2 ;;
      --python) need_value "$arg" $# "${2:-}"; PYTHON=$2; shift 2 ;;
      -e|--env) need_value "$arg" $# "${2:-}"; ENVS+=("$2"); shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --config=*|--config.*|--workdir=*) TRAIN_ARGS+=("$arg"); shift ;;
      --config|--workdir) need_value "$arg" $# "${2:-}"; TRAIN_ARGS+=("$arg" "$2"); shift 2 ;;
      --) shift; TRAIN_ARGS+=("$@"); break ;;
      -*)
        OPT_SHIFT=0
        parse_option "$@"
        [[ $OPT_SHIFT -gt 0 ]] || die "unknown option '$arg'"
        shift "$OPT_SHIFT" ;;
      *)
        [[ -z $CMD ]] || die "unexpected argument '$arg' (subcommand is already '$CMD')"
        CMD=$arg; shift ;;
    esac
  done
}

# check_subcommand NAME...: CMD must be one of the NAMEs.
check_subcommand() {
  [[ -n $CMD ]] || { usage >&2; die "missing subcommand"; }
  local name
  for name in "$@"; do
    [[ $CMD == "$name" ]] && return 0
  done
  die "unknown subcommand '$CMD'"
}

check_module_and_envs() {
  [[ $MODULE =~ ^[A-Za-z_][A-Za-z0-9_.]*$ ]] || die "--module must be a Python module name, got '$MODULE'"
  local kv
  for kv in "${ENVS[@]+"${ENVS[@]}"}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env expects KEY=VALUE, got '$kv'"
  done
}
