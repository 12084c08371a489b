#!/usr/bin/env bash
# Stop a run on every worker (SIGTERM to the pid launch.sh recorded); the TPU VM keeps running.
# A relaunch of the same run resumes from its last checkpoint. delete.sh releases the TPUs.
USAGE="stop.sh --name NAME --zone ZONE [--run train] [--project P] [--dry-run]"
ACCEPTS="name zone project run dry-run"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require name zone run
location_flags
# shellcheck disable=SC2088  # ~ expands on the worker
dir="~/$LOG_ROOT/$OPT_run"
ssh_all "pid=$dir/\$(hostname).pid; \
if $ALIVE && kill \"\$(cat \$pid)\"; then echo \"\$(hostname): stopped\"; else echo \"\$(hostname): not running\"; fi"
