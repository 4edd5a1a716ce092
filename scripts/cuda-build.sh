#!/usr/bin/env bash
# Build the CUDA binaries (`--features cuda`) on a machine with no GPU and no CUDA install, with the
# toolkit from PyPI wheels. See docs/cuda.md for why each step is here.
#
#   scripts/cuda-build.sh            # release build of xtask (train, eval, em-loss, bench) into target-cuda/
#   CUDA_COMPUTE_CAP=80 scripts/cuda-build.sh   # another GPU generation (default 90: H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${EM_CUDA_VENV:-$HOME/.cache/oneshot-em/cuda13-venv}
cap=${CUDA_COMPUTE_CAP:-90}
target=${CARGO_TARGET_DIR:-target-cuda}

# CUDA 13.0 to match the driver of the GPU machines we run on (580, CUDA 13.0): candle loads its
# kernels as PTX, and PTX from a newer nvcc does not JIT on an older driver.
if [ ! -x "$venv/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi
[ -e "$venv/lib/python3.11/site-packages/nvidia/cu13/lib/libnvrtc.so.13" ] ||
  "$venv/bin/pip" install -q nvidia-cuda-nvrtc==13.0.88
cu=$(cd "$venv/lib/python3.11/site-packages/nvidia/cu13" && pwd)

# The wheels ship only versioned shared objects (libcublas.so.13); CMake's FindCUDAToolkit and
# the linker look for the unversioned names, which a toolkit install has as links.
for so in cudart cublas cublasLt curand nvrtc; do
  [ -e "$cu/lib/lib$so.so" ] || ln -s "$(cd "$cu/lib" && ls lib$so.so.* | head -1)" "$cu/lib/lib$so.so"
done
# llama-cpp-sys-2 asks the linker for static cuBLAS, which the wheels do not ship: empty stand-ins
# for those archives, and cuBLAS linked as a shared library instead (found at run time in the GPU
# machine's own CUDA 13.0). It searches `$CUDA_LIBRARY_PATH/lib64`, so the overlay is laid out so,
# with the wheel's libraries (libcudart_static.a among them) linked in beside the stand-ins.
overlay=$(pwd)/$target/cuda-link/lib64
mkdir -p "$overlay"
for f in "$cu"/lib/lib*; do
  ln -sf "$f" "$overlay/$(basename "$f")"
done
for a in cublas_static cublasLt_static culibos; do
  [ -f "$overlay/lib$a.a" ] || ar rc "$overlay/lib$a.a"
done
export CUDA_LIBRARY_PATH="$(dirname "$overlay")"
# candle's cudarc links the driver library, which only a GPU machine has: a stub with the driver
# API's symbols (as the toolkit's lib64/stubs/libcuda.so is) satisfies the linker, and the real
# libcuda.so.1 is loaded at run time.
if [ ! -f "$overlay/libcuda.so" ]; then
  gcc -E -P -x c "$cu/include/cuda.h" 2>/dev/null | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' |
    tr -d '( \t' | sort -u | sed 's/.*/void &(void) {}/' > "$overlay/libcuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$overlay/libcuda.so" "$overlay/libcuda-stub.c"
fi

export PATH="$cu/bin:$PATH"
export CUDA_PATH="$cu" CUDA_ROOT="$cu" CUDA_HOME="$cu" CUDAToolkit_ROOT="$cu"
export CUDA_COMPUTE_CAP="$cap"              # candle's kernels: PTX for this generation
export CMAKE_CUDA_ARCHITECTURES="$cap"      # llama.cpp's kernels: only this generation
export CMAKE_CUDA_COMPILER="$cu/bin/nvcc"
export LIBRARY_PATH="$overlay:$cu/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-lcublas -C link-arg=-lcublasLt"

start=$(date +%s)
cargo build --release --target-dir "$target" -p xtask --features cuda
echo "cuda build: $(( $(date +%s) - start )) s"
# What travels to a GPU machine is at most 64 MiB: the stripped binary (~130 MB, mostly kernels)
# compressed is about 50 MB. scripts/gpu-check.sh unpacks it.
strip -o "$target/xtask-stripped" "$target/release/xtask"
xz -T0 -6 -f -c "$target/xtask-stripped" > "$target/xtask.xz"
ls -l "$target/release/xtask" "$target/xtask-stripped" "$target/xtask.xz"
