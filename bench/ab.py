"""A/B of our service against itself under another configuration, with llama-server beside both: N websocket
clients released together, interleaved repetitions, every side asked new questions from its own range (so no
side reads another's cached prompts).

Made for judging one engine change on a shared machine, where a full ``bench/run.py`` row moves 5-10% between
runs: the sides run back to back in every repetition, and each answer's decode speed is also read from the
server's own timing (ours: ``usage.tokens_per_second``; llama-server: ``timings.predicted_per_second``), which
leaves out connection, prompt preparation and prefill. Each side's server CPU time per generated token (all its
threads, from /proc) is the steadiest figure of the three: two identical servers agree on it within 1-2% where
their throughput differs by 5-10% between repetitions, and on a machine whose cores the servers keep busy, as
here, a side that needs less CPU per token serves more tokens.

    python bench/ab.py --clients 4 --reps 5 B:LLM_DRAFT_TOKENS=0          # B: ours with that setting
    python bench/ab.py --clients 8 B:OMP_WAIT_POLICY=passive B:LLM_PARALLEL=16
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import requests
from _clients import TIMEOUT, ask_ours, run_together
from _llama_server import llama_server
from _quiet import process_seconds
from _raw import RawLlama
from _servers import our_server, write_personality
from run import CONCURRENT_FROM, SYSTEM, prompts

from app import ModelSpecs
from llm.engine.model import gpu_layers
from llm.settings import load_settings, physical_cores


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("changes", nargs="*", help="B:NAME=VALUE environment settings for side B")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--threads", type=int, default=physical_cores(), help="CPU threads for every side")
    parser.add_argument("--no-llama-server", action="store_true", help="only A against B")
    args = parser.parse_args(argv)
    if not all(change.startswith("B:") and "=" in change for change in args.changes):
        parser.error("changes are B:NAME=VALUE")
    args.b = dict(change[2:].split("=", 1) for change in args.changes)
    return args


def ask_llama_server(base: str, raw: RawLlama, question: str, tokens: int) -> tuple[int, float]:
    """One greedy completion of the prompt our chat format renders, streamed token by token as ours is (a client
    reading every token costs CPU on this machine too): (tokens, server-side decode tok/s)."""
    body = {"prompt": raw.render(SYSTEM, question), "n_predict": tokens, "temperature": 0, "repeat_penalty": 1.0,
            "cache_prompt": True, "stream": True}
    with requests.post(base + "/completion", json=body, stream=True, timeout=(10, TIMEOUT)) as response:
        response.raise_for_status()
        for line in response.iter_lines(chunk_size=None):  # each event as it arrives
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                if event.get("stop"):
                    timings = event["timings"]
                    return timings["predicted_n"], timings["predicted_per_second"]
    raise RuntimeError("llama-server's stream ended without its final event")


def measure(sides: dict[str, tuple[int, Callable[[str], tuple[int, float]]]],
            args: argparse.Namespace) -> dict[str, list]:
    """Per side (server pid, ask) and repetition: (aggregate tok/s over the wall time, median per-stream
    server-side tok/s, server CPU ms per token)."""
    serials = {side: itertools.count(CONCURRENT_FROM + 100_000 * index) for index, side in enumerate(sides)}
    for side, (_, ask) in sides.items():
        ask(prompts(1, serials[side])[0])  # warm-up
    results: dict[str, list] = {side: [] for side in sides}
    for _ in range(args.reps):
        for side, (pid, ask) in sides.items():
            questions = prompts(args.clients, serials[side])
            cpu, start = process_seconds(pid), time.perf_counter()
            answers = run_together(ask, questions)  # every client released at the same instant
            wall, cpu = time.perf_counter() - start, process_seconds(pid) - cpu
            tokens = sum(tokens for tokens, _ in answers)
            results[side].append((tokens / wall, statistics.median(rate for _, rate in answers),
                                  1000 * cpu / max(tokens, 1)))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(None, {"LLM_CPU_THREADS": args.threads})
    spec = ModelSpecs(settings)()
    layers = gpu_layers(settings.gpu_layers)
    raw = RawLlama(spec, settings)

    def ours(base: str) -> Callable[[str], tuple[int, float]]:
        def ask(question: str) -> tuple[int, float]:
            stream = ask_ours(base, question)
            return stream.tokens, stream.server_rate or 0.0
        return ask

    try:
        with tempfile.TemporaryDirectory(prefix="bench-ab-") as directory, contextlib.ExitStack() as servers:
            write_personality(Path(directory), SYSTEM, args.tokens)
            a = servers.enter_context(our_server(spec.path, args.threads, Path(directory), layers, name="A"))
            b = servers.enter_context(our_server(spec.path, args.threads, Path(directory), layers, name="B",
                                                 **args.b))
            sides = {"A (ours)": (a.process.pid, ours(a.base)),
                     f"B (ours, {' '.join(args.changes) or 'same'})": (b.process.pid, ours(b.base))}
            if not args.no_llama_server:
                peer = servers.enter_context(llama_server(spec.path, args.threads, spec.context_window,
                                                          settings.parallel, layers))
                sides["llama-server"] = (peer.process.pid,
                                         lambda question: ask_llama_server(peer.base, raw, question, args.tokens))
            results = measure(sides, args)
    finally:
        raw.close()
    base = results["A (ours)"]
    print(f"| side ({args.clients} clients, {args.reps} repetitions) | aggregate tok/s, best | vs A | median | vs A "
          "| median stream tok/s, best | vs A | server CPU ms/token, median | vs A |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side, runs in results.items():
        rate, stream = max(run[0] for run in runs), max(run[1] for run in runs)
        middle, cpu = statistics.median(run[0] for run in runs), statistics.median(run[2] for run in runs)
        print(f"| {side} | {rate:.1f} | {rate / max(run[0] for run in base):.2f}x | {middle:.1f} | "
              f"{middle / statistics.median(run[0] for run in base):.2f}x | {stream:.1f} | "
              f"{stream / max(run[1] for run in base):.2f}x | {cpu:.2f} | "
              f"{cpu / statistics.median(run[2] for run in base):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
