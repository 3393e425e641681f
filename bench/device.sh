#!/usr/bin/env bash
# The bench on a lent GPU machine (no network there): builds llama.cpp with CUDA from the sources
# bench/device_pack.sh packed into .device/ (shared libraries for our service through LLAMA_CPP_LIB_PATH, and
# llama-server beside them, so both sides run the same kernels), writes a random-weight 8B-class GGUF with the
# embedded model's tokenizer, and runs bench/run.py at 1, 8 and 32 clients with every layer on the GPU. Each step
# is skipped when its result is already there, so a run stopped at the time limit goes on where it stopped.
#
#   device run, kind nvidia-h200 (four copies of a 15 GiB model and two 32-slot caches), carry [".device"]:
#     bash bench/device.sh                 # the table lands in $OUT/bench.md, the logs beside it
#   here, to test it on the CPU:  LLM_DEVICE_BACKEND=cpu LLM_DEVICE_SIZE=tiny bash bench/device.sh
set -euo pipefail
cd "$(dirname "$0")/.."
backend="${LLM_DEVICE_BACKEND:-cuda}"
size="${LLM_DEVICE_SIZE:-8b}"
work="${LLM_DEVICE_WORK:-/tmp/llm-device}"
out="${OUT:-$work/out}"
python="${LLM_DEVICE_PYTHON:-python3}"
mkdir -p "$work" "$out"
log() { echo "device: $(date +%T) $*" | tee -a "$out/steps.log" >&2; }

# The carried wheels, unless this Python already has the service's packages (a test here, in the project's venv).
if ! "$python" -c "import flask, uvicorn, llguidance" 2>/dev/null && [ ! -f "$work/site/.done" ]; then
  log "installing $(ls .device/wheels | wc -l) wheels"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
    .device/wheels/*.whl
  touch "$work/site/.done"
fi
export PYTHONPATH="$work/site:$PWD/.device/python${PYTHONPATH:+:$PYTHONPATH}"

build="$work/build-$backend"
if [ ! -x "$build/bin/llama-server" ]; then
  [ -d "$work/llama.cpp" ] || { mkdir -p "$work/llama.cpp" && tar xzf .device/llama.cpp.tar.gz -C "$work/llama.cpp"; }
  options=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF
           -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
           -DLLAMA_CURL=OFF)
  if [ "$backend" = cuda ]; then
    command -v nvcc >/dev/null || { echo "device: no nvcc on PATH" >&2; exit 2; }
    arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)"
    options+=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${arch:-90}")
  fi
  generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
  log "building llama.cpp ($backend) in $build"
  cmake -S "$work/llama.cpp" -B "$build" "${generator[@]}" "${options[@]}" >"$out/cmake.log" 2>&1 \
    || { tail -30 "$out/cmake.log"; exit 1; }
  cmake --build "$build" --target llama-server llama mtmd -j "$(nproc)" >>"$out/cmake.log" 2>&1 \
    || { tail -40 "$out/cmake.log"; exit 1; }
fi
export LLAMA_CPP_LIB_PATH="$build/bin" LLM_BENCH_LLAMA_SERVER="$build/bin/llama-server"

model="$work/random-$size.gguf"
if [ ! -f "$model" ]; then
  log "writing $model"
  "$python" bench/random_gguf.py "$model.part" --size "$size" --like .device/vocab.gguf
  mv "$model.part" "$model"
fi

log "bench: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo cpu)"
layers=-1; [ "$backend" = cpu ] && layers=0
LLM_MODEL_FILE="$model" LLM_GPU_LAYERS="$layers" LLM_PARALLEL="${LLM_DEVICE_PARALLEL:-32}" \
  LLM_CONTEXT_WINDOW="${LLM_DEVICE_CONTEXT:-4096}" PYTHONUNBUFFERED=1 \
  "$python" bench/run.py --clients "${LLM_DEVICE_CLIENTS:-1,8,32}" ${LLM_DEVICE_BENCH_ARGS:-} \
  2> >(tee "$out/bench.log" >&2) | tee "$out/bench.md"
log "done"
