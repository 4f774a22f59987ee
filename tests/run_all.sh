#!/usr/bin/env bash
# The whole test suite: tests/dcdit (pure PyTorch, no services) in one pytest process, then one process per
# other test module. Platform modules start real services (local Ray clusters, mlflow servers, moto S3,
# `ray start --head` for job submission, multi-node ray.cluster_utils clusters); a fresh interpreter per module
# keeps one module's Ray session from leaking into the next. Extra arguments go to every pytest call.
# Ends with "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
passed=0; failed=0; bad=()
for module in tests/dcdit $(find tests -name 'test_*.py' -not -path 'tests/dcdit/*' | sort); do
    echo "=== $module"
    out=$("$PY" -m pytest -q -p no:cacheprovider "$module" "$@" 2>&1); rc=$?
    echo "$out" | tail -n 15
    summary=$(echo "$out" | tail -n 1)
    p=$(echo "$summary" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || true)
    f=$(echo "$summary" | grep -oE '[0-9]+ (failed|error|errors)' | awk '{s+=$1} END {print s+0}')
    passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0}))
    if [ "$rc" -ne 0 ]; then bad+=("$module"); [ "${f:-0}" -eq 0 ] && failed=$((failed + 1)); fi
done
[ ${#bad[@]} -gt 0 ] && echo "failing modules: ${bad[*]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
