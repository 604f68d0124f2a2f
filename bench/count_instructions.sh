#!/usr/bin/env bash
# Instructions per proxy hop (parse+validate+modify+serialize), counted by
# callgrind: repeatable on a shared machine where wall-clock rates drift.
# Usage: bench/count_instructions.sh [hops]
set -euo pipefail
cd "$(dirname "$0")/.."
hops=${1:-3000}
py=$(python3 -c "import sys; print(sys.executable)")
count() {
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$py" -c "
import sys; sys.path[:0] = ['bench', '.']
import bench_parse as b
for _ in range(200 + $1): b.one_hop(b.INVITE)
" 2>&1 | awk '/Collected/ {gsub(",", "", $4); print $4}'
}
base=$(count 0)
total=$(count "$hops")
echo "$(( (total - base) / hops )) instructions per hop ($hops hops, callgrind)"
