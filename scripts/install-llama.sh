#!/usr/bin/env bash
# Builds llama-cpp-python for one llama.cpp back-end, so `make install` (and the Docker image) rebuild it when the
# back-end changes and fail with a clear message when the CUDA toolkit is incomplete.
#
#   scripts/install-llama.sh PIP VERSION cpu|cuda
#
# cuda: nvcc and cuBLAS must be present; CMAKE_CUDA_ARCHITECTURES is the present GPUs' compute capability
# (nvidia-smi), else LLM_CUDA_ARCHITECTURES, else 75;80;86;89;90 (Turing, Ampere, Ada and Hopper).
# cpu: a CUDA build left from before is replaced; otherwise the project's own install builds it.
set -euo pipefail
pip="$1" version="$2" backend="$3"
python="$(dirname "$pip")/python"

gpu_build() {
  "$python" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null
}

case "$backend" in
  cpu)
    if gpu_build; then
      echo "llama.cpp back-end: cpu (replacing the CUDA build)"
      CMAKE_ARGS="-DGGML_CUDA=off" "$pip" install --force-reinstall --no-deps "llama-cpp-python==$version"
    else
      echo "llama.cpp back-end: cpu"
    fi
    ;;
  cuda)
    nvcc="$(command -v nvcc || true)"
    if [ -z "$nvcc" ]; then
      echo "error: LLM_BACKEND=cuda needs the CUDA toolkit's nvcc on PATH (install it, or use LLM_BACKEND=cpu)" >&2
      exit 2
    fi
    root="$(dirname "$(dirname "$(readlink -f "$nvcc")")")"
    if ! compgen -G "$root/lib64/libcublas.so*" >/dev/null && ! compgen -G "$root/targets/*/lib/libcublas.so*" >/dev/null \
        && ! { command -v ldconfig >/dev/null && ldconfig -p | grep -q libcublas; }; then
      echo "error: LLM_BACKEND=cuda needs cuBLAS (libcublas, part of the CUDA toolkit) next to $nvcc" >&2
      exit 2
    fi
    archs="${LLM_CUDA_ARCHITECTURES:-}"
    if [ -z "$archs" ] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
      archs="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | tr -d ' .' | sort -u | paste -sd ';')"
    fi
    archs="${archs:-75;80;86;89;90}"
    echo "llama.cpp back-end: cuda, CMAKE_CUDA_ARCHITECTURES=$archs ($nvcc)"
    # --no-cache-dir: a CUDA wheel must never be taken from (or left in) pip's cache for a later CPU install.
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$archs" \
      "$pip" install --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$version"
    gpu_build || echo "note: built for CUDA; llama.cpp reports no usable GPU here (no driver?)" >&2
    ;;
  *)
    echo "error: LLM_BACKEND must be auto, cpu or cuda (got '$backend')" >&2
    exit 2
    ;;
esac
