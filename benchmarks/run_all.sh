#!/bin/sh
# Run every benchmark in sequence with the venv's interpreter (override with PYTHON=...).
# BENCH_QUICK=1 shortens B6; BENCH_SIZES=1000,10000 skips the 100k detect order.
set -u
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-/work/venv/bin/python}
[ -x "$py" ] || py=python3
status=0
for b in detect_scale validate_memory b1_independent b2_chain b4_one_file b6_idle_cpu; do
    echo "=== $b"
    "$py" "$here/$b.py" || status=1
    echo
done
exit $status
