#!/usr/bin/env bash
# Start `urm-jax train CONFIG [overrides]` on every worker at once, detached. Each worker logs to
# ~/urm-logs/RUN/<hostname>.log and records its pid next to it (status.sh, logs.sh, stop.sh use
# them). On a TPU pod every worker runs the same command; JAX finds the other workers itself.
USAGE="launch.sh --name NAME --zone ZONE --config configs/hardware/v5p-8.yaml [--run train] [--project P] [--dry-run] [-- key=value ...]"
ACCEPTS="name zone project config run dry-run"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require name zone config run
[[ -f $OPT_config ]] || die "--config $OPT_config: no such file (paths are relative to the repository root)"
location_flags
# shellcheck disable=SC2088  # ~ expands on the worker
dir="~/$LOG_ROOT/$OPT_run"
train=$(quote .venv/bin/urm-jax train "$OPT_config" "${EXTRA_ARGS[@]}")
ssh_all "set -e; cd ~/$REMOTE_DIR; mkdir -p $dir; pid=$dir/\$(hostname).pid; \
if $ALIVE; then echo \"\$(hostname): run $OPT_run is already running\" >&2; exit 1; fi; \
URM_JAX_DISTRIBUTED=1 JAX_PLATFORMS=tpu nohup $train > $dir/\$(hostname).log 2>&1 < /dev/null & echo \$! > \$pid; \
echo \"\$(hostname): started run $OPT_run, pid \$(cat \$pid)\""
