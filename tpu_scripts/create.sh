#!/usr/bin/env bash
# Create a TPU VM (slice): on demand, --spot (preemptible, cheaper), or --queued (a queued
# resource: waits for capacity instead of failing; combine with --spot for a queued spot slice).
# The runtime version defaults by family: v5p -> v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e.
USAGE="create.sh --name NAME --zone ZONE --type v5p-8|v5p-32|v6e-8|v6e-64|... [--version RUNTIME] [--project P] [--spot] [--queued] [--dry-run]"
ACCEPTS="name zone project type version spot queued dry-run"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require name zone type
[[ $OPT_type =~ ^(v[0-9]+[a-z]*)-[0-9]+$ ]] || die "--type '$OPT_type' is not an accelerator type like v5p-8 or v6e-64"
if [[ -z $OPT_version ]]; then
  case ${BASH_REMATCH[1]} in
    v5p) OPT_version=v2-alpha-tpuv5 ;;
    v6e) OPT_version=v2-alpha-tpuv6e ;;
    v5litepod) OPT_version=v2-alpha-tpuv5-lite ;;
    *) die "no default runtime for $OPT_type: pass --version" ;;
  esac
fi
location_flags
spot=()
if ((OPT_spot)); then spot=(--spot); fi

if ((OPT_queued)); then
  run gcloud compute tpus queued-resources create "$OPT_name" --node-id="$OPT_name" "${LOCATION[@]}" \
    --accelerator-type="$OPT_type" --runtime-version="$OPT_version" "${spot[@]}"
else
  run gcloud compute tpus tpu-vm create "$OPT_name" "${LOCATION[@]}" \
    --accelerator-type="$OPT_type" --version="$OPT_version" "${spot[@]}"
fi
