#!/usr/bin/env bash
# The GPU check (docs/cuda.md), about 8 minutes on one GPU machine. Run from the repository root
# there, with target-cuda/xtask.xz built by scripts/cuda-build.sh on a CPU machine and carried.
# Every step's log and the GPU memory it used (nvidia-smi, every 200 ms) go to $OUT (default
# gpu-check/); summary.txt has one line per step.
set -uo pipefail
out=${OUT:-gpu-check}
work=${WORK:-/tmp/gpu-check-work}
mkdir -p "$out" "$work"
xtask=${XTASK:-$work/xtask}
[ -x "$xtask" ] || { xz -d -c target-cuda/xtask.xz > "$xtask" && chmod +x "$xtask"; }
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
ldd "$xtask" | grep -E 'cublas|cudart|curand|not found' | tee "$out/ldd.txt"

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit, logging GPU memory meanwhile.
step() {
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/$name.mem" &
  local smi=$! start
  start=$(date +%s.%N)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  kill "$smi" 2>/dev/null
  local secs peak
  secs=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
  peak=$(sort -n "$out/$name.mem" | tail -1)
  echo "$name rc=$rc seconds=$secs peak_gpu_mib=$peak" | tee -a "$out/summary.txt"
  tail -4 "$out/$name.log"
}

# 1. The EM loss and every gradient on cuda against cpu (loss 1e-4, gradients 1e-3 relative):
#    the repository's tiny Qwen2 fixture through `em-loss`, then SmolLM2-135M's shapes with
#    random weights (its real weights are 98 MB, over what travels with the tree).
python3 - "$work/fixture-input.json" <<'EOF'
import json, random, sys
random.seed(3)
seqs = [{"prompt_ids": [random.randrange(1, 200) for _ in range(12)],
         "response_ids": [random.randrange(1, 200) for _ in range(40)]} for _ in range(4)]
json.dump({"temperature": 0.5, "sequences": seqs}, open(sys.argv[1], "w"))
EOF
step em-loss-fixture 60 "$xtask" em-loss --model fixtures/tiny-qwen2 \
  --input "$work/fixture-input.json" --device cuda --check-against cpu
step em-loss-smollm2-shapes 150 "$xtask" bench em-step --random-config smollm2-135m \
  --device cuda --check-against cpu --responses 4 --response-len 128 --micro-batches 2

# 2. One EM update of a random-weight model with Qwen2.5-Math-1.5B's config: 64 responses ×
#    512 tokens (64-token prompt + 448), bf16 weights with f32 master weights, micro-batch 8.
step update-qwen2.5-math-1.5b 180 "$xtask" bench em-step --random-config qwen2.5-math-1.5b \
  --device cuda --dtype bf16 --responses 64 --prompt-len 64 --response-len 448 \
  --micro-batches 8 --steps 1

# 3. llama.cpp CUDA sampling on the same model: the random weights as an f16 GGUF (the tiny
#    fixture's tokenizer, the vocabulary padded to the config's rows), 32 sequences.
step save-qwen2.5-math-1.5b 60 "$xtask" bench em-step --random-config qwen2.5-math-1.5b \
  --save-hf "$work/qwen-1.5b"
cp fixtures/tiny-qwen2/tokenizer.json fixtures/tiny-qwen2/tokenizer_config.json "$work/qwen-1.5b/"
step convert-qwen2.5-math-1.5b 60 "$xtask" convert --force --outtype f16 \
  -o "$work/qwen-1.5b.gguf" "$work/qwen-1.5b"
EM_BENCH_MODEL="$work/qwen-1.5b.gguf" EM_BENCH_ANCHOR=0 EM_BENCH_B=32 EM_BENCH_PP=64 \
  EM_BENCH_TG=256 EM_BENCH_REPS=2 \
  step sample-qwen2.5-math-1.5b 90 "$xtask" bench sample --work-dir "$work"
cat "$out/summary.txt"
