#!/usr/bin/env bash
# Run a command (by default the suite, `make test`) with two CPU-bound processes per core running
# alongside, and the load average logged each minute to stderr: no test may depend on how fast
# the machine is (issue 10, kind 13). Usage: bash tests/under_load.sh [command ...]
set -uo pipefail
burners=()
cleanup() { kill "${burners[@]}" "$monitor" 2>/dev/null; }
trap cleanup EXIT
for _ in $(seq $((2 * $(nproc)))); do
    python3 -c 'while True: pass' &
    burners+=($!)
done
( while sleep 60; do echo "under_load: $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)" >&2; done ) &
monitor=$!
if [ $# -eq 0 ]; then set -- make test; fi
"$@"
