#!/usr/bin/env bash
# The longer faults campaign (docs/reliability.md): the kill -9, S3 and Vault fault tests with
# more rounds than CI runs. Every round starts its operation afresh and kills it at a new random
# point (seeded: a round is repeatable), checks the repository, and finally lets a run finish.
#
#   scripts/faults_campaign.sh [TRIALS]      # default 10; CI runs 1
#
# Prints one "campaign:" line per operation and round, then pytest's summary. Runs only against
# this machine: PostgreSQL, moto and OpenBao from the test rig, on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
trials="${1:-10}"
python="${PYTHON:-.venv/bin/python}"
log="$(mktemp -t drkit-faults-XXXXXX.log)"
echo "faults campaign: ${trials} rounds per test; full output in ${log}"
set +e
DRKIT_FAULT_TRIALS="$trials" "$python" -m pytest -n 0 -s -q \
    tests/test_kill9.py tests/test_s3_faults.py tests/test_vault_faults.py tests/test_leases.py \
    >"$log" 2>&1
status=$?
set -e
grep '^campaign: ' "$log" || true
tail -n 3 "$log"
exit "$status"
