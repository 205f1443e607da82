#!/usr/bin/env bash
# One study driver (benchmarks/synthetic_lvis_study.py run), restarted after every run so
# that each run starts with the code as it is then; stops when no run is left to take.
# Start one per free core:  nohup benchmarks/synthetic_lvis_study.sh > output/study/driver0.log 2>&1 &
# Arguments are passed to every `run` (e.g. --arms atss_focal atss_efl --seeds 0).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
while true; do
  "$PY" benchmarks/synthetic_lvis_study.py run --max-runs 1 "$@"
  status=$?
  [[ $status == 3 ]] && { echo "no run left to take"; exit 0; }
  [[ $status != 0 ]] && { echo "driver failed ($status)"; exit "$status"; }
done
