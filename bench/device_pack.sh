#!/usr/bin/env bash
# Packs what bench/device.sh needs on a lent GPU machine, which reaches no network, into .device/ (git-ignored;
# the device tool's `carry` takes it along, 64 MiB at most with the working tree):
#   llama.cpp.tar.gz  the llama.cpp that llama-cpp-python vendors, without docs, tests, models and other back-ends
#   python/llama_cpp  llama-cpp-python's Python package (its libraries are built there, LLAMA_CPP_LIB_PATH)
#   wheels/           the service's and the bench's packages that the machine's Python 3.12 image lacks
#   vocab.gguf        the embedded model's tokenizer and chat template, for the random-weight model
#
#   bash bench/device_pack.sh        (then: device run, carry [".device"], command "bash bench/device.sh")
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
version="$($python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
out=.device
rm -rf "$out" && mkdir -p "$out/wheels" "$out/python"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

$python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src="$(echo "$work"/llama_cpp_python-*/)"
cp -r "$src/llama_cpp" "$out/python/"
# CPU and CUDA back-ends only (the tools' CMake files name every tool's folder, so all of them go).
tar czf "$out/llama.cpp.tar.gz" -C "$src/vendor/llama.cpp" \
  --exclude='ggml/src/ggml-'{vulkan,sycl,metal,opencl,cann,musa,hip,kompute,webgpu,zdnn,rpc,blas,hexagon,zendnn,openvino} \
  --exclude='tools/server/tests' CMakeLists.txt cmake common ggml include src vendor licenses gguf-py tools app scripts

# Packages missing from the machine's image (KINDS.md lists what it has), for CPython 3.12 on x86-64 Linux.
packages=(flask itsdangerous blinker flask-cors limits deprecated google-re2 regress uvicorn websockets a2wsgi
  jsonschema referencing jsonschema-specifications rpds-py beautifulsoup4 soupsieve feedparser feedparser-sgmllib
  llguidance wordllama toml pypdf python-docx sqlean.py sqlite-vec psycopg psycopg-binary psycopg-pool diskcache
  websocket-client gguf fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv sse-starlette
  starlette-context annotated-types typing-inspection opentelemetry-api)
wheel() {  # one package's wheel for the machine (--no-deps: every one it needs is in the list)
  $python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$out/wheels" "$1"
}
for package in "${packages[@]}"; do  # the version installed here where there is a wheel of it, else the newest
  installed="$($python -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$package" \
    2>/dev/null || true)"
  wheel "$package${installed:+==$installed}" 2>/dev/null || wheel "$package"
done

$python bench/random_gguf.py "$out/vocab.gguf" --vocab-only
du -sh "$out" "$out"/* | sed 's/^/device_pack: /'
