"""llama.cpp's own C++ ``llama-server``, built from the very llama.cpp that the installed llama-cpp-python wheel
vendors (its sdist from PyPI), so the bench compares the two servers on the same kernels.

The build (CMake target ``llama-server``; no web UI, no download of a prebuilt one, no OpenSSL) takes several
minutes on two cores and is kept in ``~/.cache/llm-service/llama-server-<version>-<backend>``; later runs reuse
it. Nothing here is committed: the sources come from the package registry at bench time.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import llama_cpp
import requests
from _clients import Stream
from _servers import Server, free_port

CACHE = Path(os.environ.get("LLM_MODEL_CACHE_DIR", "~/.cache/llm-service")).expanduser()


def llama_server_binary() -> Path:
    """The built ``llama-server`` for the installed llama-cpp-python version and back-end (built when missing), or
    the one ``LLM_BENCH_LLAMA_SERVER`` names (``bench/device.sh`` builds it beside the libraries it serves with)."""
    prebuilt = os.environ.get("LLM_BENCH_LLAMA_SERVER")
    if prebuilt:
        return Path(prebuilt)
    version = importlib.metadata.version("llama-cpp-python")
    backend = "cuda" if llama_cpp.llama_supports_gpu_offload() else "cpu"
    home = CACHE / f"llama-server-{version}-{backend}"
    binary = home / "llama-server"
    if binary.exists():
        return binary
    print(f"bench: building llama-server {version} ({backend}) once into {home}; this takes several minutes",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as work:
        source = _sources(version, Path(work))
        build = Path(work) / "build"
        options = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
                   "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                   "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
                   f"-DGGML_CUDA={'ON' if backend == 'cuda' else 'OFF'}"]
        _run(["cmake", "-S", str(source), "-B", str(build), *options])
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)])
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build / "bin" / "llama-server", binary)
    return binary


def _sources(version: str, work: Path) -> Path:
    """llama.cpp's sources from the llama-cpp-python sdist on PyPI (pip's cache makes a second fetch free)."""
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
          f"llama-cpp-python=={version}", "-d", str(work)])
    archive = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(archive) as sdist:
        sdist.extractall(work, filter="data")
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{(result.stdout + result.stderr)[-3000:]}")


def llama_server(model: str, threads: int, context: int, slots: int, gpu_layers: int) -> Server:
    """``llama-server`` with ``slots`` parallel sequences sharing ``context`` tokens each, as ours runs them
    (``--kv-unified`` off: a stream per sequence), the same threads and GPU layers."""
    port = free_port()
    command = [str(llama_server_binary()), "--model", model, "--threads", str(threads), "--threads-batch",
               str(threads), "--ctx-size", str(context * slots), "--parallel", str(slots), "--n-gpu-layers",
               str(gpu_layers), "--host", "127.0.0.1", "--port", str(port), "--no-webui", "--cont-batching"]
    return Server("llama-server", command, dict(os.environ), port, "/health")


def same_input(base: str, raw, text: str) -> str | None:
    """None when llama-server reads ``text`` as the same tokens as the service's tokenizer and greedily starts the
    same answer as llama.cpp in-process; otherwise what differs (the rows would not compare like with like)."""
    theirs = requests.post(base + "/tokenize", json={"content": text, "add_special": True}, timeout=60).json()["tokens"]
    mine = raw.model.tokenize(text)
    if theirs != mine:
        return f"llama-server reads {len(theirs)} tokens where the service reads {len(mine)}"
    answer = requests.post(base + "/completion", json={"prompt": text, "n_predict": 16, "temperature": 0,
                                                       "repeat_penalty": 1.0, "cache_prompt": False},
                           timeout=300).json()["content"]
    own = raw.text(raw.generate(text, 16).tokens)
    if not own.startswith(answer) or not answer:
        return f"greedy answers differ: llama-server {answer!r}, llama.cpp {own!r}"
    return None


def chat_turns(base: str, system: str, questions: list[str], max_tokens: int) -> list[Stream]:
    """One conversation on llama-server's ``/v1/chat/completions`` (the client keeps the history, as its users
    do; the server reuses the cached prefix): one streamed answer per question."""
    messages, streams = [{"role": "system", "content": system}], []
    for question in questions:
        messages.append({"role": "user", "content": question})
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "top_p": 1, "repeat_penalty": 1.0,
                "stream": True}
        start, first, text, reason = time.perf_counter(), None, [], None
        with requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=(10, 300)) as response:
            response.raise_for_status()
            for line in response.iter_lines(chunk_size=None):
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or [{}]
                piece = (choices[0].get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
                reason = choices[0].get("finish_reason") or reason
        end = time.perf_counter()
        messages.append({"role": "assistant", "content": "".join(text)})
        streams.append(Stream(start, first or end, end, len(text), reason, text="".join(text)))
    return streams
