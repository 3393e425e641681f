"""Servers under test, each a real HTTP server in its own process group on 127.0.0.1.

Both sides run as subprocesses so they pay the same costs (HTTP parsing, a network socket, the GIL of their
own process) and so a crash or hang in one cannot take the bench down. Every server is stopped in a
``finally`` and its process group killed if it does not stop within a few seconds.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent

BENCH_PERSONALITY = """\
name = "{name}"
description = "Benchmark personality: greedy, fixed answer length."
intro = "Benchmark."
system_prompt = "{system}"

[sampling]
temperature = 0
top_p = 1
repeat_penalty = 1.0
max_tokens = {tokens}
speculative = {speculative}
"""


PEER_MODULES = ("uvicorn", "fastapi", "sse_starlette", "pydantic_settings", "starlette_context")


def missing_peer_modules() -> list[str]:
    """What ``llama-cpp-python[server]`` needs that is not installed (checked before anything starts)."""
    return [name for name in PEER_MODULES if importlib.util.find_spec(name) is None]


def free_port() -> int:
    """A port nobody listens on right now (the kernel's choice on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_personality(directory: Path, system: str, tokens: int) -> None:
    """The bench personalities: temperature 0 and max_tokens fixed, so both sides do the same work; ``bench``
    with speculative decoding (the default), ``bench-nodraft`` without."""
    for name, speculative in (("bench", "true"), ("bench-nodraft", "false")):
        (directory / f"{name}.toml").write_text(BENCH_PERSONALITY.format(name=name, system=system, tokens=tokens,
                                                                          speculative=speculative))


class Server:
    """A subprocess serving HTTP; ``with`` starts it, waits until ``ready_path`` answers 200, and stops it."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, ready_path: str,
                 start_timeout: float = 180.0):
        self.name, self.command, self.env, self.port = name, command, env, port
        self.ready_path, self.start_timeout = ready_path, start_timeout
        self.base = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is not None and self.process is not None:
            print(f"--- last lines of {self.name}'s log ---\n{self.log_tail()}", file=sys.stderr)
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.base + self.ready_path, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready after {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after 10 s; only this server's own group is touched."""
        process, self.process = self.process, None
        try:
            if process is not None:
                _terminate(process)
        finally:
            self.log.close()
            Path(self.log.name).unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        text = Path(self.log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def _terminate(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def our_server(model: str, threads: int, personalities: Path, gpu_layers: int | None = None,
               name: str = "ours", **settings: str) -> Server:
    """``python app.py`` with the bench personality, the given model file, thread count and GPU layers (None: the
    service's own default); ``settings`` add or replace environment variables (``DATABASE_URL``...)."""
    port = free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "LLM_MODEL_FILE": model,
           "LLM_CPU_THREADS": str(threads), "LLM_PERSONALITIES_DIR": str(personalities),
           "DATABASE_URL": f"sqlite:///{personalities / 'bench.db'}", **settings}
    if gpu_layers is not None:
        env["LLM_GPU_LAYERS"] = str(gpu_layers)
    return Server(name, [sys.executable, "app.py"], env, port, "/health")


def peer_server(model: str, threads: int, context: int, gpu_layers: int = 0) -> Server:
    """llama-cpp-python's own server; ``--interrupt_requests False`` so new requests queue, not kill others; the
    same GPU layers as ours (its default is none, which would pit ours on a GPU against it on the CPU)."""
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--n_ctx", str(context), "--interrupt_requests", "False",
               "--n_gpu_layers", str(gpu_layers), "--host", "127.0.0.1", "--port", str(port)]
    return Server("llama_cpp.server", command, dict(os.environ), port, "/v1/models")
