"""CPU time per streamed token, by thread, of our service under N websocket clients.

Wall-clock rows move 5-10% between runs on a shared machine; the CPU time of the Python threads per token moves
much less, and on a machine with as many cores as llama.cpp threads every millisecond of it is taken from
llama.cpp (those threads run while ``llama_decode`` has released the GIL, so they preempt a llama.cpp thread).
llama.cpp's own threads spin while they wait (OpenMP), so their rows are about 2 cores / throughput and say
little. This serves the real stack in this process (``BackgroundServer``: the engine, uvicorn, the answer pool)
so every thread is known by its Python name, drives it from a separate client process, and reads each thread's
user and system time from ``/proc`` before and after.

    python bench/cpu.py --clients 4 --reps 3            # the table
    python bench/cpu.py --clients 4 LLM_DRAFT_TOKENS=0   # with settings (NAME=VALUE)
    python bench/cpu.py --fake 0.02                       # the web stack alone: a scripted engine, a token
                                                          # every 20 ms per answer, no model
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from _clients import ask_ours, run_together
from _quiet import stat_seconds
from _servers import write_personality
from run import CONCURRENT_FROM, SYSTEM, prompts

from llm.settings import physical_cores


def thread_times() -> dict[int, float]:
    """CPU seconds (user + system) of every thread of this process, by native id."""
    return {int(tid): stat_seconds(f"/proc/self/task/{tid}/stat") for tid in os.listdir("/proc/self/task")}


def group(name: str) -> str:
    """A pool's threads as one row: ``ws-answer_3`` -> ``ws-answer``."""
    return re.sub(r"[_-]\d+$", "", name)


def by_group(before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    names = {thread.native_id: group(thread.name) for thread in threading.enumerate()}
    spent: dict[str, float] = defaultdict(float)
    for tid, seconds in after.items():
        spent[names.get(tid, "native (llama.cpp workers)")] += seconds - before.get(tid, 0.0)
    return dict(spent)


class DecodeClock:
    """Times every ``llama_decode`` of the scheduler and the gaps between them (the scheduler's own Python per
    step: sampling, handing tokens out, building the next batch), by wrapping the binding it calls."""

    def __init__(self) -> None:
        import llama_cpp

        self.decodes: list[float] = []
        self.gaps: list[float] = []
        self._last_end: float | None = None
        original = llama_cpp.llama_decode

        def timed(ctx, batch):
            start = time.perf_counter()
            try:
                return original(ctx, batch)
            finally:
                end = time.perf_counter()
                if self._last_end is not None and start - self._last_end < 0.1:  # not an idle spell
                    self.gaps.append(start - self._last_end)
                self.decodes.append(end - start)
                self._last_end = end

        llama_cpp.llama_decode = timed

    def reset(self) -> None:
        self.decodes.clear()
        self.gaps.clear()


def client_process(url: str, clients: int, reps: int, tokens: int, first: int) -> None:
    """The clients, in their own process: ``reps`` rounds of ``clients`` answers asked together."""
    serial = itertools.count(first)
    total = 0
    for _ in range(reps):
        streams = run_together(lambda prompt: ask_ours(url, prompt), prompts(clients, serial))
        total += sum(stream.tokens for stream in streams)
    print(json.dumps({"tokens": total}))


def clients(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the clients failed:\n{done.stderr[-3000:]}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", nargs="*", help="NAME=VALUE settings for the service")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--fake", type=float, metavar="SECONDS",
                        help="a scripted engine (no model) writing a token every SECONDS per answer")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run as the client process
    args = parser.parse_args(argv)
    if args.client:
        client_process(args.client, args.clients, args.reps, args.tokens, CONCURRENT_FROM + 5000)
        return 0

    from app import create_app
    from llm.web.server import BackgroundServer

    directory = Path(tempfile.mkdtemp(prefix="bench-cpu-"))
    write_personality(directory, SYSTEM, args.tokens)
    config = {"LLM_PERSONALITIES_DIR": str(directory), "LLM_CPU_THREADS": str(args.threads),
              "DATABASE_URL": f"sqlite:///{directory / 'bench.db'}", "LLM_DATA_DIR": str(directory),
              **dict(setting.split("=", 1) for setting in args.settings)}
    clock = DecodeClock()
    engine = None
    if args.fake is not None:
        from llm.engine.fake import FakeEngine

        engine = FakeEngine([f" word{i}" for i in range(args.tokens)], delay=args.fake)
    app = create_app(config, engine=engine)
    server = BackgroundServer(app)
    server.thread.name = "uvicorn-loop"
    try:
        command = [sys.executable, __file__, "--client", server.url, "--clients", str(args.clients),
                   "--reps", "1", "--tokens", str(args.tokens)]
        clients(command)  # warm up: model loaded, pools started
        command[command.index("--reps") + 1] = str(args.reps)
        clock.reset()
        before, started = thread_times(), time.perf_counter()
        done = clients(command)
        wall = time.perf_counter() - started
        spent = by_group(before, thread_times())  # while every thread is still alive and named
    finally:
        server.close()
    tokens = json.loads(done.stdout.splitlines()[-1])["tokens"]
    print(f"{args.clients} clients x {args.reps} rounds, {tokens} tokens in {wall:.1f} s "
          f"({tokens / wall:.1f} tok/s), settings: {' '.join(args.settings) or 'defaults'}")
    if clock.decodes:
        percentiles = statistics.quantiles(clock.gaps, n=100)
        print(f"per step: llama_decode median {1000 * statistics.median(clock.decodes):.2f} ms, the scheduler's "
              f"Python between decodes median {1000 * statistics.median(clock.gaps):.3f} ms, "
              f"mean {1000 * statistics.fmean(clock.gaps):.3f} ms, p90 {1000 * percentiles[89]:.3f} ms, "
              f"p99 {1000 * percentiles[98]:.3f} ms ({len(clock.decodes)} steps)")
    print(f"{'thread':32} {'CPU s':>8} {'ms/token':>9}")
    for name, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        if seconds > 0:
            print(f"{name:32} {seconds:8.2f} {1000 * seconds / tokens:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
