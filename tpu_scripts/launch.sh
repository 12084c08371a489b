#!/usr/bin/env bash
# Start `urm-jax train CONFIG [overrides]` on every worker at once, detached. Each worker logs to
# ~/urm-logs/RUN/<hostname>.log and records its pid next to it (status.sh, logs.sh, stop.sh use
# them). On a TPU pod every worker runs the same command; JAX finds the other workers itself.
# First, here, `urm-jax plan` compiles the recipe for its TPU topology (plan.topology) on this
# machine's CPU: a recipe that would run out of HBM never takes the pod. It needs libtpu here
# (pip install 'jax[tpu]==0.10.2') and minutes of CPU (~20 for the 8B on 2 cores); --no-plan
# skips it. --plan-python picks the Python that has urm-jax and libtpu (default: .venv/bin/python).
USAGE="launch.sh --name NAME --zone ZONE --config configs/hardware/v5p-8.yaml [--run train] [--project P] [--no-plan] [--plan-python PY] [--dry-run] [-- key=value ...]"
ACCEPTS="name zone project config run no-plan plan-python dry-run"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require name zone config run
[[ -f $OPT_config ]] || die "--config $OPT_config: no such file (paths are relative to the repository root)"
location_flags
if ((!OPT_no_plan)); then
  py=${OPT_plan_python:-.venv/bin/python}
  if ! run "$py" -m urm_jax.cli plan "$OPT_config" "${EXTRA_ARGS[@]}"; then
    echo "error: urm-jax plan did not pass for $OPT_config (above): nothing launched (--no-plan skips the check)" >&2
    exit 1
  fi
fi
# shellcheck disable=SC2088  # ~ expands on the worker
dir="~/$LOG_ROOT/$OPT_run"
train=$(quote .venv/bin/urm-jax train "$OPT_config" "${EXTRA_ARGS[@]}")
ssh_all "set -e; cd ~/$REMOTE_DIR; mkdir -p $dir; pid=$dir/\$(hostname).pid; \
if $ALIVE; then echo \"\$(hostname): run $OPT_run is already running\" >&2; exit 1; fi; \
URM_JAX_DISTRIBUTED=1 JAX_PLATFORMS=tpu nohup $train > $dir/\$(hostname).log 2>&1 < /dev/null & echo \$! > \$pid; \
echo \"\$(hostname): started run $OPT_run, pid \$(cat \$pid)\""
