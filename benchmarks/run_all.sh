#!/bin/sh
# Run every benchmark in sequence with the venv's interpreter (override with PYTHON=...).
# BENCH_QUICK=1 shortens B6; BENCH_SIZES=1000,10000 skips the 100k detect order.
# BENCH_PAUSE=s (default 60) between scripts: each removes its generated trees at its end, and on ext4 without a
# journal every file created within 60 s of many deletions scans the freed inodes (the next script's runs slow).
set -u
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-$here/../.venv/bin/python}
[ -x "$py" ] || py=python3
status=0
first=1
for b in detect_scale validate_memory b1_independent b2_chain b4_one_file b6_idle_cpu b7_real_build; do
    [ "$first" = 1 ] || sleep "${BENCH_PAUSE:-60}"
    first=0
    echo "=== $b"
    "$py" "$here/$b.py" || status=1
    echo
done
exit $status
