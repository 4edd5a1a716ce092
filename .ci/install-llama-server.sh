#!/usr/bin/env bash
# Install a real OpenAI-compatible server (llama-cpp-python[server], CPU build) into a venv under
# the project's cache dir, for the tests that talk to a server over HTTP. Idempotent: when the venv
# already imports llama_cpp.server nothing is done. pip's wheel cache keeps the built wheel, so a
# reinstall after deleting the venv skips the llama.cpp build.
#
# Prints one line at the end: the venv's python (point EM_LLAMA_SERVER_PYTHON at it, or leave it at
# the default path, which tests/src/server.rs looks for).
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36

cache_dir="${EM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/oneshot-em}"
venv="$cache_dir/llama-server-venv"
py="$venv/bin/python"
log="$cache_dir/llama-server-install.log"

fail() {
  echo "install-llama-server: $1" >&2
  exit 1
}

installed() {
  [ -x "$py" ] && "$py" -c 'import llama_cpp.server, llama_cpp, sys
sys.exit(0 if llama_cpp.__version__ == sys.argv[1] else 1)' "$LLAMA_CPP_PYTHON_VERSION" \
    >/dev/null 2>&1
}

if installed; then
  echo "$py"
  exit 0
fi

mkdir -p "$cache_dir"
command -v python3 >/dev/null 2>&1 || fail "python3 not found"

if [ ! -x "$py" ]; then
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian's python3 lacks venv/ensurepip without python3-venv.
    rm -rf "$venv"
    if command -v apt-get >/dev/null 2>&1; then
      export DEBIAN_FRONTEND=noninteractive
      { apt-get install -y -qq python3-venv || { apt-get update -qq && apt-get install -y -qq python3-venv; }; } \
        >>"$log" 2>&1 || fail "could not apt-get install python3-venv (see $log)"
    fi
    python3 -m venv "$venv" >>"$log" 2>&1 || fail "python3 -m venv $venv failed (see $log)"
  fi
fi

# CPU-only shared libs; llama.cpp's own tests/examples/tools/server are off by default when built
# as a subproject; the multimodal (mtmd) library is not needed for text completions. Not
# `GGML_NATIVE`: on a VM whose CPU reports AMX the native build traps with an invalid opcode on
# the first sampled request (measured); AVX2 + FMA + F16C runs on every x86-64 CI machine.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF}"
jobs="${EM_BUILD_JOBS:-2}"
export CMAKE_BUILD_PARALLEL_LEVEL="$jobs" MAKEFLAGS="-j$jobs"

echo "install-llama-server: building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION into $venv (log: $log)" >&2
{
  "$py" -m pip install -q --upgrade pip &&
    "$py" -m pip install --prefer-binary "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION"
} >>"$log" 2>&1 || fail "pip install llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION failed; last lines of $log: $(tail -n 5 "$log" | tr '\n' ' ')"

installed || fail "llama-cpp-python installed but 'import llama_cpp.server' fails in $py (see $log)"
echo "$py"
