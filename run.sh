#!/usr/bin/env bash
# Entry point for a fresh machine: sets up .venv when missing, then runs
#   ./run.sh pipeline [flags]   the three-phase main job (kd-dagfm pipeline)
#   ./run.sh test [args]        the test suite (pytest)
#   ./run.sh <kd-dagfm command> any other kd-dagfm subcommand
# Everything runs in a loopback-only network namespace.
set -euo pipefail
cd "$(dirname "$0")"

if [[ $# -lt 1 ]]; then
    sed -n '2,6p' "$0" >&2
    exit 2
fi
bash scripts/bootstrap.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export RAY_USAGE_STATS_ENABLED=0
command="$1"
shift
case "$command" in
    test)
        exec bash scripts/loopback.sh .venv/bin/python -m pytest "$@" ;;
    *)
        exec bash scripts/loopback.sh .venv/bin/kd-dagfm "$command" "$@" ;;
esac
