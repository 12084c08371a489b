# shellcheck shell=bash disable=SC2034  # the variables below are read by the scripts that source this
# Shared by tpu_scripts/*.sh (sourced, never run): flag parsing, required flags, and `run`, which
# executes a command or, under --dry-run, prints it quoted so that it can be pasted into a shell
# (local paths are relative to the repository root: the scripts cd there first).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=urm-jax   # the checkout on every worker, under the home directory
LOG_ROOT=urm-logs    # per-run logs and pid files on every worker, under the home directory
cd "$REPO_ROOT"
# Worker-side test that the process in the pid file at $pid is alive (a zombie is not).
# shellcheck disable=SC2016  # expanded on the worker
ALIVE='[ -f $pid ] && ps -o stat= -p "$(cat $pid)" | grep -qv Z'

# Every flag any script knows; each script lists the ones it accepts in ACCEPTS.
OPT_name="" OPT_zone="" OPT_project="" OPT_type="" OPT_version="" OPT_config="" OPT_dest=""
OPT_run="train" OPT_repo="" OPT_ref="HEAD" OPT_python="python3.11"
OPT_spot=0 OPT_queued=0 OPT_yes=0 OPT_dry_run=0 OPT_no_plan=0 OPT_plan_python=""
SWITCHES=" spot queued yes dry-run no-plan "
EXTRA_ARGS=()

die() {
  echo "error: $*" >&2
  echo "usage: $USAGE" >&2
  exit 2
}

# parse_flags "$@": --flag value, --flag=value, switches, and `--` before pass-through arguments.
parse_flags() {
  local flag key value
  while (($# > 0)); do
    flag=$1
    shift
    case $flag in
      --) EXTRA_ARGS=("$@"); return ;;
      -h | --help) echo "usage: $USAGE"; exit 0 ;;
      --*=*) key=${flag%%=*}; key=${key#--}; value=${flag#*=} ;;
      --*)
        key=${flag#--}
        if [[ $SWITCHES == *" $key "* ]]; then
          value=1
        else
          (($# > 0)) || die "$flag needs a value"
          value=$1
          shift
        fi ;;
      *) die "unexpected argument '$flag' (training overrides go after --)" ;;
    esac
    [[ " $ACCEPTS " == *" $key "* ]] || die "unknown flag --$key"
    printf -v "OPT_${key//-/_}" '%s' "$value"
  done
  # The run name becomes a directory on every worker.
  [[ $OPT_run =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run '$OPT_run': use letters, digits, '.', '_' or '-'"
}

# require name zone ...: fail clearly on a missing required flag.
require() {
  local key var
  for key in "$@"; do
    var="OPT_${key//-/_}"
    [[ -n ${!var} ]] || die "--$key is required"
  done
}

# The zone/project flags every gcloud call gets.
location_flags() {
  LOCATION=(--zone="$OPT_zone")
  if [[ -n $OPT_project ]]; then LOCATION+=(--project="$OPT_project"); fi
}

# quote WORD...: each word as the shell needs it: bare when safe, else in single quotes
# (only the value of a --flag=value).
quote() {
  local out=() word flag
  for word in "$@"; do
    flag=""
    if [[ $word =~ ^(--[a-z-]+=)(.*)$ ]]; then
      flag=${BASH_REMATCH[1]} word=${BASH_REMATCH[2]}
    fi
    if [[ ! $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      word="'${word//\'/\'\\\'\'}'"
    fi
    out+=("$flag$word")
  done
  echo "${out[*]}"
}

# run CMD ARG...: execute, or print the exact command under --dry-run.
run() {
  if ((OPT_dry_run)); then
    quote "$@"
    return
  fi
  if [[ $1 == gcloud ]] && ! command -v gcloud >/dev/null; then
    echo "error: gcloud not found (install the Google Cloud CLI, or use --dry-run)" >&2
    exit 2
  fi
  "$@"
}

# ssh_all COMMAND: run one shell command on every worker of the TPU VM.
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$OPT_name" --worker=all "${LOCATION[@]}" --command="$1"
}
