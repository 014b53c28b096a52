#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite; arguments go to pytest, e.g. the quick tier:
#   bash scripts/test.sh -m "not slow and not ray"
# CI (.ci/run) calls exactly this, without arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# --durations: the slowest phases close the log, so where the time goes stays visible
exec python -m pytest -q --durations=25 "$@"
