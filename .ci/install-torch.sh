#!/usr/bin/env bash
# Install PyTorch, transformers and the PEFT library into a venv under the project's cache dir:
# the tests that check our adapters load in PEFT, and `bench em-step`'s PyTorch baseline, run
# against it. Idempotent: when the venv already imports the pinned versions nothing is done.
#
# Prints one line at the end: the venv's python (point EM_TORCH_PYTHON at it).
set -euo pipefail

TORCH_VERSION=2.15.0
TRANSFORMERS_VERSION=5.24.0
PEFT_VERSION=0.21.2

cache_dir="${EM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/oneshot-em}"
venv="$cache_dir/torch-venv"
py="$venv/bin/python"
log="$cache_dir/torch-install.log"

fail() {
  echo "install-torch: $1" >&2
  exit 1
}

installed() {
  [ -x "$py" ] && "$py" -c 'import sys, torch, transformers, peft
want = sys.argv[1:]
have = [torch.__version__.split("+")[0], transformers.__version__, peft.__version__]
sys.exit(0 if have == want else 1)' "$TORCH_VERSION" "$TRANSFORMERS_VERSION" "$PEFT_VERSION" \
    >/dev/null 2>&1
}

if installed; then
  echo "$py"
  exit 0
fi

mkdir -p "$cache_dir"
command -v python3 >/dev/null 2>&1 || fail "python3 not found"
if [ ! -x "$py" ]; then
  if ! python3 -m venv "$venv" >>"$log" 2>&1; then
    rm -rf "$venv"
    if command -v apt-get >/dev/null 2>&1; then
      export DEBIAN_FRONTEND=noninteractive
      { apt-get install -y -qq python3-venv || { apt-get update -qq && apt-get install -y -qq python3-venv; }; } \
        >>"$log" 2>&1 || fail "could not apt-get install python3-venv (see $log)"
    fi
    python3 -m venv "$venv" >>"$log" 2>&1 || fail "python3 -m venv $venv failed (see $log)"
  fi
fi

echo "install-torch: torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION peft==$PEFT_VERSION into $venv (log: $log)" >&2
# PyPI's torch wheel (its CUDA libraries come along; ~5.6 GB installed). One retry: a dropped
# download is the usual failure.
for attempt in 1 2; do
  if "$py" -m pip install -q --no-cache-dir "torch==$TORCH_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" "peft==$PEFT_VERSION" safetensors >>"$log" 2>&1; then
    break
  fi
  [ "$attempt" = 2 ] && fail "pip install failed twice; last lines of $log: $(tail -n 5 "$log" | tr '\n' ' ')"
done

installed || fail "installed, but $py cannot import the pinned torch, transformers and peft (see $log)"
echo "$py"
