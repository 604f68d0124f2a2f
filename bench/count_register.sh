#!/usr/bin/env bash
# Instructions per registration (B1's REGISTER, 401, REGISTER with digest, 200) in one process's core,
# counted by callgrind: repeatable where wall-clock CPU time on a shared machine drifts by 10%.
# Includes the few percent bench/cost_register.py spends answering the 401 as a phone would.
# Usage: bench/count_register.sh [registrations]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}
export PYTHONHASHSEED=0
py=$(python3 -c "import sys; print(sys.executable)")
count() {
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$py" bench/cost_register.py --rounds 1 \
    --registrations "$1" 2>&1 | awk '/Collected/ {gsub(",", "", $4); print $4}'
}
base=$(count 100)
total=$(count $((100 + n)))
echo "$(( (total - base) / n )) instructions per registration ($n registrations, callgrind)"
