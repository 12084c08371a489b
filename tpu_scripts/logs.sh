#!/usr/bin/env bash
# Copy every worker's log of a run into logs/RUN/ here (one <hostname>.log per worker).
USAGE="logs.sh --name NAME --zone ZONE [--run train] [--project P] [--dry-run]"
ACCEPTS="name zone project run dry-run"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require name zone run
location_flags
run mkdir -p "logs/$OPT_run"
run gcloud compute tpus tpu-vm scp "$OPT_name:$LOG_ROOT/$OPT_run/*.log" "logs/$OPT_run/" --worker=all "${LOCATION[@]}"
