#!/usr/bin/env bash
# Install urm-jax on every worker: Python 3.11 (apt, if missing), the code in ~/urm-jax, and
# `pip install -e '.[tpu]'` into ~/urm-jax/.venv. The code is this checkout (tracked and
# untracked files, without .git, .venv, build, logs), copied with scp; or, with --repo URL,
# a git clone of URL at --ref (branch, tag or commit; default: the remote's HEAD).
USAGE="setup.sh --name NAME --zone ZONE [--project P] [--repo URL [--ref REF]] [--python python3.11] [--dry-run]"
ACCEPTS="name zone project repo ref python dry-run"
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
parse_flags "$@"
require name zone
location_flags
py=$(quote "$OPT_python")
install_python="$py -m venv --help >/dev/null 2>&1 || { sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $py $py-venv git; }"
install_pkg="cd ~/$REMOTE_DIR && { [ -x .venv/bin/python ] || $py -m venv .venv; } && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu]' && .venv/bin/python -c 'import jax, urm_jax; print(urm_jax.__name__, jax.__version__)'"

if [[ -n $OPT_repo ]]; then
  repo=$(quote "$OPT_repo") ref=$(quote "$OPT_ref")
  get_code="{ [ -d ~/$REMOTE_DIR/.git ] || git clone -q $repo ~/$REMOTE_DIR; } && git -C ~/$REMOTE_DIR fetch -q $repo $ref && git -C ~/$REMOTE_DIR checkout -q --detach FETCH_HEAD"
else
  tarball=build/tpu/urm-jax-src.tar.gz
  run mkdir -p build/tpu
  run tar -czf "$tarball" --exclude-vcs --exclude=./.venv --exclude=./build --exclude=./logs \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude='*.egg-info' .
  run gcloud compute tpus tpu-vm scp "$tarball" "$OPT_name:urm-jax-src.tar.gz" --worker=all "${LOCATION[@]}"
  get_code="mkdir -p ~/$REMOTE_DIR && tar -xzf ~/urm-jax-src.tar.gz -C ~/$REMOTE_DIR"
fi
ssh_all "set -e; $install_python; $get_code; $install_pkg"
