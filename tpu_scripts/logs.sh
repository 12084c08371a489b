#!/usr/bin/env bash
# Copy every worker's log of a run into logs/RUN/ (or --dest DIR) here, one <hostname>.log each.
USAGE="logs.sh --name NAME --zone ZONE [--run train] [--dest logs/RUN] [--project P] [--dry-run]"
ACCEPTS="name zone project run dest dry-run"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require name zone run
location_flags
dest=${OPT_dest:-logs/$OPT_run}
run mkdir -p "$dest"
run gcloud compute tpus tpu-vm scp "$OPT_name:$LOG_ROOT/$OPT_run/*.log" "${dest%/}/" --worker=all "${LOCATION[@]}"
