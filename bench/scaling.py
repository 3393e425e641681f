"""Scaling bench for docs/SCALING.md: one replica against two behind nginx, and the in-process engine against the
same model behind a remote upstream (what the hop costs).

Sides, all up at once (an idle server uses no CPU) so that each repetition runs every side in turn and a slow
spell of the machine hits them all:

* ``1 replica``: ``python app.py`` with every thread, clients connect to it directly;
* ``1 replica, nginx``: the same process behind nginx (what the proxy costs);
* ``1 replica, 2x slots``: one process with twice ``LLM_PARALLEL``, as many sequences as the two replicas hold
  together (whether a gain of two replicas on one machine comes from their slots);
* ``2 replicas, nginx``: two processes with half the threads each behind nginx (``least_conn``); the same
  cores in all. Each process keeps its own SQLite file here: every client asks one question in a new
  conversation, so nothing needs sharing (production shares PostgreSQL; tests/test_replicas.py tests that);
* ``llama-server``: llama.cpp's C++ server on its own (``/v1/chat/completions``), the upstream of the next;
* ``ours -> llama-server``: this service with ``LLM_UPSTREAMS`` pointing at it: our websocket, personalities
  and conversations, the model's work done upstream.

Clients are the bench's: each asks one new question on a new connection and reads the streamed answer; figures
are aggregate tokens/s (all tokens over the wall time of the run) and the 95th percentile of the time to first
token, each the best of ``--reps`` repetitions. ``make bench-scaling`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bench package, for bench._cluster

from _clients import Stream, aggregate, ask_chat, ask_ours, run_together  # noqa: E402
from _llama_server import llama_server  # noqa: E402
from _quiet import Quiet  # noqa: E402
from _servers import our_server, write_personality  # noqa: E402
from run import SYSTEM, prompts  # noqa: E402

from app import ModelSpecs  # noqa: E402
from bench._cluster import Nginx  # noqa: E402
from llm.settings import load_settings, physical_cores  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=physical_cores(), help="CPU threads in all, per side")
    parser.add_argument("--clients", default="8,16", help="concurrent client counts, comma-separated")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (the best is kept)")
    args = parser.parse_args(argv)
    args.clients = sorted({int(part) for part in args.clients.split(",") if part.strip()})
    if not args.clients or min(args.clients) < 1 or args.threads < 2 or args.reps < 1:
        parser.error("--clients must be positive, --threads at least 2 (two replicas get half each)")
    return args


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else values[0]


def measure(sides: dict[str, Callable[[str], Stream]], quiet: Quiet, args: argparse.Namespace) -> dict:
    """{(side, clients): (best tokens/s, best p95 first token, tokens per answer)}. Sides share processes (a
    replica, the upstream), so each side numbers its questions from its own range (same digit count, same
    length): no side is answered from another's cached prompt."""
    serials = {side: itertools.count(10_000 * (n + 1)) for n, side in enumerate(sides)}
    for n, ask in enumerate(sides.values()):  # warm-up: weights paged in, every slot used once, system prompt cached
        run_together(ask, prompts(max(args.clients), itertools.count(1000 * (n + 1))))
    runs: dict[tuple[str, int], list[list[Stream]]] = {(side, n): [] for side in sides for n in args.clients}
    order = list(sides.items())
    for _ in range(args.reps):
        for clients in args.clients:
            for side, ask in order:
                runs[side, clients].append(quiet.run(
                    lambda ask=ask, side=side, clients=clients: run_together(ask, prompts(clients, serials[side]))))
        order = order[1:] + order[:1]  # each repetition starts with another side
    return {key: (max(aggregate(streams)[0] for streams in value),
                  min(p95([s.ttft for s in streams]) for streams in value),
                  statistics.median(s.tokens for streams in value for s in streams))
            for key, value in runs.items()}


def table(results: dict, sides: list[str], args: argparse.Namespace) -> str:
    base = sides[0]
    lines = ["| side | clients | tokens/s | vs 1 replica | p95 first token (s) | vs 1 replica | tokens/answer |",
             "|---|---|---|---|---|---|---|"]
    for clients in args.clients:
        for side in sides:
            rate, first, tokens = results[side, clients]
            lines.append(f"| {side} | {clients} | {rate:.1f} | {rate / results[base, clients][0]:.2f}x | "
                         f"{first:.2f} | {first / results[base, clients][1]:.2f}x | {tokens:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop every server on the way out
    settings = load_settings(None, {"LLM_CPU_THREADS": args.threads})
    spec = ModelSpecs(settings)()
    half = args.threads // 2
    print(f"bench: {spec.path}, {args.threads} threads per side, {settings.parallel} slots, load average "
          f"{os.getloadavg()[0]:.2f}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as directory, contextlib.ExitStack() as stack:
        home = Path(directory)
        write_personality(home, SYSTEM, args.tokens)

        def database(name: str) -> dict[str, str]:
            return {"DATABASE_URL": f"sqlite:///{home / name}.db"}

        one = stack.enter_context(our_server(spec.path, args.threads, home, name="replica", **database("one")))
        doubled = stack.enter_context(our_server(spec.path, args.threads, home, name="replica-2x", **database("2x"),
                                                 LLM_PARALLEL=str(2 * settings.parallel)))
        pair = [stack.enter_context(our_server(spec.path, half, home, name=f"replica-{n}", **database(f"r{n}")))
                for n in (1, 2)]
        proxied_one = stack.enter_context(Nginx([one]))
        proxied_pair = stack.enter_context(Nginx(pair, balance="least_conn;"))
        upstream = stack.enter_context(llama_server(spec.path, args.threads, spec.context_window, settings.parallel,
                                                    0))
        remote = stack.enter_context(our_server(spec.path, 1, home, name="ours-remote",
                                                LLM_UPSTREAMS=f"{upstream.base}/v1", **database("remote")))
        servers = [one, doubled, *pair, proxied_one, proxied_pair, upstream, remote]
        quiet = Quiet([os.getpid(), *(server.process.pid for server in servers)])
        sides = {
            "1 replica": lambda prompt: ask_ours(one.base, prompt),
            "1 replica, nginx": lambda prompt: ask_ours(proxied_one.base, prompt),
            "1 replica, 2x slots": lambda prompt: ask_ours(doubled.base, prompt),
            "2 replicas, nginx": lambda prompt: ask_ours(proxied_pair.base, prompt),
            "llama-server": lambda prompt: ask_chat(upstream.base, prompt, args.tokens, SYSTEM, temperature=0,
                                                    top_p=1),
            "ours -> llama-server": lambda prompt: ask_ours(remote.base, prompt),
        }
        results = measure(sides, quiet, args)
    print(table(results, list(sides), args))
    print(f"\n{Path(spec.path).name}, {args.threads} threads per side (two replicas: {half} each), "
          f"{settings.parallel} slots per process, {args.tokens}-token answers, best of {args.reps}; "
          f"load average {os.getloadavg()[0]:.2f} at the end; {quiet.repeated} measurements repeated because "
          f"other processes were busy.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
