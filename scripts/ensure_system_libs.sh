#!/usr/bin/env bash
# Optional system libraries: Debian's jemalloc for the worker (lower peak memory, see
# app/allocator.py). Best effort: the app runs the same without it.
set -uo pipefail
if ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's libjemalloc2 for the worker..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2 \
    >/dev/null) || echo "libjemalloc2 could not be installed; the worker uses glibc's malloc" >&2
fi
exit 0
