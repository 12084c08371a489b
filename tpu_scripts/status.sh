#!/usr/bin/env bash
# The TPU VM's state and health (and the queued resource's, with --queued); then, on every
# worker, whether the run is alive and the last lines of its log.
USAGE="status.sh --name NAME --zone ZONE [--run train] [--project P] [--queued] [--dry-run]"
ACCEPTS="name zone project run queued dry-run"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require name zone run
location_flags
if ((OPT_queued)); then
  run gcloud compute tpus queued-resources describe "$OPT_name" "${LOCATION[@]}" --format='value(state.state)'
fi
run gcloud compute tpus tpu-vm describe "$OPT_name" "${LOCATION[@]}" \
  --format='table(name.basename(),acceleratorType,state,health,runtimeVersion)'
# shellcheck disable=SC2088  # ~ expands on the worker
dir="~/$LOG_ROOT/$OPT_run"
ssh_all "pid=$dir/\$(hostname).pid; \
if $ALIVE; then echo \"\$(hostname): running\"; else echo \"\$(hostname): not running\"; fi; \
tail -n 3 $dir/\$(hostname).log 2>/dev/null || true"
