#!/usr/bin/env bash
# Delete the TPU VM (with --queued: the queued resource and its VM). gcloud asks to confirm
# unless --yes.
USAGE="delete.sh --name NAME --zone ZONE [--project P] [--queued] [--yes] [--dry-run]"
ACCEPTS="name zone project queued yes dry-run"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require name zone
location_flags
quiet=()
if ((OPT_yes)); then quiet=(--quiet); fi
if ((OPT_queued)); then
  run gcloud compute tpus queued-resources delete "$OPT_name" "${LOCATION[@]}" --force "${quiet[@]}"
else
  run gcloud compute tpus tpu-vm delete "$OPT_name" "${LOCATION[@]}" "${quiet[@]}"
fi
