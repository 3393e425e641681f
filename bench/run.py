"""Side-by-side benchmark: our service against raw llama.cpp, llama.cpp's own C++ ``llama-server`` (built from the
llama.cpp that llama-cpp-python vendors, ``bench/_llama_server.py``) and llama-cpp-python's own server.

Every figure comes from one run, on one model, with one thread count for all sides. Each figure is the best
of several repetitions, and the two sides' repetitions are interleaved: other work on the machine can only
slow a run down, so the best run is the closest to what the code can do. Rows:

1. single-stream decode speed through our websocket versus llama.cpp's own decode loop in-process (what our
   scheduler, HTTP server and framing cost a lone user);
2. 1, 4, 8 and 16 concurrent streaming clients, ours versus ``llama-server`` and ``python -m llama_cpp.server``
   (aggregate tokens/s, worst and median first token), after checking that llama-server reads the same tokens
   and greedily writes the same answer as llama.cpp in-process;
3. time to first token at turn 10 of a conversation versus turn 1 (whether the conversation cache works), ours
   and llama-server's, and the time to first token of a ~1,500-token prompt (prefill);
4. speculative decoding (prompt-lookup drafts) on one stream: a prompt whose answer copies it, ours with drafts
   versus raw llama.cpp and versus ours without drafts (outputs compared), and free chat with and without;
5. a tool-calling turn versus a plain turn on ``/v1/chat/completions``: decode speed with tools offered (the
   answer is free text, but the tool grammar masks every token) against the same prompt without the grammar.

``make bench`` runs it (5 repetitions); ``--quick`` does one repetition of everything for a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _clients import SocketClient, Stream, aggregate, ask_chat, ask_ours, ask_peer, run_together
from _llama_server import chat_turns, llama_server, same_input
from _quiet import Quiet
from _raw import RawLlama
from _servers import Server, missing_peer_modules, our_server, peer_server, write_personality

from app import ModelSpecs
from llm.engine.model import gpu_layers
from llm.engine.tools import Tool, ToolUse
from llm.settings import load_settings, physical_cores

SYSTEM = "You are a helpful assistant."
# Distinct questions of similar length: one per concurrent client and one per conversation turn. The embedded
# base model rambles on such prompts rather than ending its turn, so answers run to the token limit.
TOPICS = ("lighthouses", "volcanoes", "bicycles", "glaciers", "libraries", "honeybees", "railways", "comets",
          "tides", "orchards", "bridges", "deserts")
QUESTION = "Question {}: tell me, in great detail, everything you know about {}."
# Every question asked of one server is new (numbered), so no answer comes from a cached copy of the same
# question; the shared system prompt may be cached, as it would be for real users. Numbers for the
# concurrency rows start at 1000 on each side, so both servers answer the very same questions there.
CONCURRENT_FROM = 1000
# An answer that copies its prompt (what RAG answers, extraction and edits do), for the speculative rows.
PASSAGE = ("The harbour lighthouse was built in 1871 from granite quarried on the island. Its lamp burned whale "
           "oil until 1904, then kerosene, and since 1952 an electric lamp whose beam reaches twenty-two nautical "
           "miles. Three keepers lived in the cottages below the tower; the last of them left in 1987, when the "
           "light was automated. The tower is open to visitors on summer weekends, and the keepers' cottages now "
           "hold a small museum of charts, logbooks and lenses.")
COPY = f"Repeat this passage exactly, word for word:\n\n{PASSAGE}"


@dataclass
class Row:
    """One line of the table; ``met`` is None where the row has no target (reported for context)."""

    measurement: str
    ours: str
    reference: str
    ratio: str
    target: str
    met: bool | None


def prompts(count: int, serial: itertools.count) -> list[str]:
    """The next ``count`` numbered questions, cycling through the topics."""
    return [QUESTION.format(n, TOPICS[n % len(TOPICS)]) for n in itertools.islice(serial, count)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=physical_cores(), help="CPU threads for every side")
    parser.add_argument("--clients", default="1,4,8,16", help="concurrent client counts, comma-separated")
    parser.add_argument("--no-llama-server", action="store_true", help="skip llama-server (it is built once)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--turns", type=int, default=10, help="conversation turn compared with turn 1")
    parser.add_argument("--quick", action="store_true", help="one repetition of everything (smoke test)")
    args = parser.parse_args(argv)
    args.clients = sorted({int(part) for part in args.clients.split(",") if part.strip()})
    if not args.clients or min(args.clients) < 1 or args.threads < 1 or args.tokens < 2 or args.turns < 2:
        parser.error("--clients and --threads must be positive, --tokens and --turns at least 2")
    args.reps = 1 if args.quick else 5
    return args


def fmt(value: float) -> str:
    """Three significant-ish digits: first-token times are tens of milliseconds, rates tens of tokens."""
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def single_stream(raw: RawLlama, base: str, quiet: Quiet, args: argparse.Namespace) -> tuple:
    """Decode tok/s of one stream: raw and ours run back to back as one measurement (best pair figures)."""
    question = prompts(1, itertools.count(1))[0]  # the same question every time: only decoding is timed
    text = raw.render(SYSTEM, question)
    raw.generate(text, 8)  # warm-up: page in the weights for this context
    pairs = [quiet.run(lambda: (raw.generate(text, args.tokens), ask_ours(base, question)))
             for _ in range(args.reps + 2)]
    return (max(stream.decode_rate for _, stream in pairs), max(run.tokens_per_second for run, _ in pairs),
            [stream.tokens for _, stream in pairs])


def summarize(runs: list[list[Stream]]) -> tuple[float, float, list[int], float]:
    """Best aggregate tok/s, best worst-first-token time, every answer's length, best median first token."""
    figures = [aggregate(streams) for streams in runs]
    return (max(rate for rate, _, _ in figures), min(worst for _, worst, _ in figures),
            [stream.tokens for streams in runs for stream in streams],
            min(statistics.median(stream.ttft for stream in streams) for streams in runs))


def concurrency(sides: dict[str, Callable[[str], Stream]], quiet: Quiet, args: argparse.Namespace) -> dict:
    """Each repetition runs every client count on each side in turn, so slow spells of the machine hit both."""
    # One question counter per side: both sides get the same new questions unless a run had to be repeated.
    serials = {side: itertools.count(CONCURRENT_FROM) for side in sides}
    for ask in sides.values():
        ask(prompts(1, itertools.count(1))[0])  # warm-up
    runs: dict[tuple[str, int], list[list[Stream]]] = {(side, n): [] for side in sides for n in args.clients}
    for _ in range(args.reps):
        for clients in args.clients:
            for side, ask in sides.items():
                runs[side, clients].append(quiet.run(
                    lambda ask=ask, side=side, clients=clients: run_together(ask, prompts(clients, serials[side]))))
    return {key: summarize(value) for key, value in runs.items()}


def conversation(base: str, questions: list[str]) -> list[Stream]:
    """One socket, one conversation, one question per turn."""
    client = SocketClient(base, "bench")
    try:
        return [client.ask(question) for question in questions]
    finally:
        client.close()


def conversation_ttft(base: str, quiet: Quiet, args: argparse.Namespace) -> tuple[float, float, list[int]]:
    """First-token time at turn 1 and at turn ``--turns`` of fresh conversations (best of each)."""
    serial = itertools.count(2000)
    runs = [quiet.run(lambda: conversation(base, prompts(args.turns, serial))) for _ in range(args.reps)]
    return (min(streams[0].ttft for streams in runs), min(streams[-1].ttft for streams in runs),
            [stream.tokens for streams in runs for stream in streams])


def server_turns(base: str, quiet: Quiet, args: argparse.Namespace) -> tuple[float, float]:
    """llama-server's first-token time at turn 1 and at turn ``--turns`` (best of each), the same questions."""
    serial = itertools.count(2000)
    runs = [quiet.run(lambda: chat_turns(base, SYSTEM, prompts(args.turns, serial), args.tokens))
            for _ in range(args.reps)]
    return min(streams[0].ttft for streams in runs), min(streams[-1].ttft for streams in runs)


def long_prompts(raw: RawLlama, ours: str, server: str, quiet: Quiet, args: argparse.Namespace) -> tuple:
    """Best first-token time of a new ~1,500-token prompt, ours against llama-server (each prompt numbered at its
    start, so only the shared system prompt is cached), and its length in tokens."""
    def prompt(n: int) -> str:
        return f"Document {n}.\n\n" + "\n\n".join(f"{i}. {PASSAGE}" for i in range(15)) + "\n\nSummarise it."

    serial = itertools.count(5000)

    def pair() -> tuple[Stream, Stream]:  # a repeated (disturbed) run takes a new number: still uncached
        n = next(serial)
        return ask_ours(ours, prompt(n)), ask_peer(server, raw.render(SYSTEM, prompt(n)), args.tokens)

    ask_ours(ours, prompt(next(serial)))  # warm-up
    pairs = [quiet.run(pair) for _ in range(args.reps)]
    length = len(raw.model.tokenize(raw.render(SYSTEM, prompt(0))))
    return min(a.ttft for a, _ in pairs), min(b.ttft for _, b in pairs), length


def speculation(raw: RawLlama, base: str, quiet: Quiet, args: argparse.Namespace) -> dict:
    """Best single-stream decode tok/s: the copy prompt on raw llama.cpp, on ours with and without drafts, and a
    free-chat question on ours with and without; whether the copy outputs are the same with and without."""
    chat = QUESTION.format(4000, "lighthouses")
    asks = {"raw": lambda: raw.generate(raw.render(SYSTEM, COPY), args.tokens),
            "copy": lambda: ask_ours(base, COPY, "bench"), "copy_plain": lambda: ask_ours(base, COPY, "bench-nodraft"),
            "chat": lambda: ask_ours(base, chat, "bench"), "chat_plain": lambda: ask_ours(base, chat, "bench-nodraft")}
    for ask in asks.values():  # warm-up: every prompt cached, so only decoding is timed
        ask()
    runs: dict[str, list] = {kind: [] for kind in asks}
    for _ in range(args.reps + 2):
        for kind, ask in asks.items():
            runs[kind].append(quiet.run(ask))
    best = {kind: max(run.tokens_per_second if kind == "raw" else run.decode_rate for run in values)
            for kind, values in runs.items()}
    best["same"] = all(a.text == b.text for a, b in zip(runs["copy"], runs["copy_plain"], strict=True))
    return best


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather and forecast for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                    "units": {"enum": ["metric", "imperial"]}},
                   "required": ["city"], "additionalProperties": False}}}]


def tool_turns(base: str, quiet: Quiet, args: argparse.Namespace) -> dict[str, tuple[float, list[int]]]:
    """Best decode tok/s of one stream, plain and with tools offered (a text answer under the tool grammar), both
    run to ``--tokens`` with ``ignore_eos``, interleaved in every repetition. The plain turn's system prompt
    carries the same tool descriptions as text, so both read the same (cached) prompt and only the grammar
    differs."""
    question = prompts(1, itertools.count(3000))[0]
    described = f"{SYSTEM}\n\n{ToolUse(tuple(Tool(**t['function']) for t in TOOLS)).system_text()}"
    kinds = {"plain": {"ignore_eos": True, "system": described}, "tools": {"ignore_eos": True, "tools": TOOLS}}
    runs: dict[str, list[Stream]] = {kind: [] for kind in kinds}
    for extra in kinds.values():  # warm-up (compiles the grammar once)
        ask_chat(base, question, args.tokens, temperature=0, **extra)
    for _ in range(args.reps + 2):
        for kind, extra in kinds.items():
            runs[kind].append(quiet.run(lambda extra=extra: ask_chat(base, question, args.tokens, temperature=0,
                                                                     **extra)))
    return {kind: (max(stream.decode_rate for stream in streams), [stream.tokens for stream in streams])
            for kind, streams in runs.items()}


def measure(ours: Server, peer: Server, server: Server | None, raw: RawLlama, quiet: Quiet,
            args: argparse.Namespace) -> dict:
    """Every row; the peers are asked the prompt text our chat format renders, so all read the same tokens."""
    sides = {"ours": lambda question: ask_ours(ours.base, question),
             "peer": lambda question: ask_peer(peer.base, raw.render(SYSTEM, question), args.tokens)}
    checked = None
    if server is not None:
        checked = same_input(server.base, raw, raw.render(SYSTEM, prompts(1, itertools.count(1))[0]))
        sides["server"] = lambda question: ask_peer(server.base, raw.render(SYSTEM, question), args.tokens)
    print(f"bench: {', '.join(map(str, args.clients))} concurrent clients, {', '.join(sides)}", file=sys.stderr)
    results = concurrency(sides, quiet, args)
    results["server_check"] = checked
    print("bench: single stream, ours and raw llama.cpp", file=sys.stderr)
    results["single"] = single_stream(raw, ours.base, quiet, args)
    print(f"bench: conversations of {args.turns} turns", file=sys.stderr)
    results["turns"] = conversation_ttft(ours.base, quiet, args)
    if server is not None:
        print("bench: llama-server's conversations, and long prompts on both", file=sys.stderr)
        results["server_turns"] = server_turns(server.base, quiet, args)
        results["long"] = long_prompts(raw, ours.base, server.base, quiet, args)
    print("bench: speculative decoding, single stream", file=sys.stderr)
    results["speculation"] = speculation(raw, ours.base, quiet, args)
    print("bench: tool-calling turns against plain turns (ours)", file=sys.stderr)
    results["tools"] = tool_turns(ours.base, quiet, args)
    return results


def verdict(met: bool | None) -> str:
    return "—" if met is None else "yes" if met else "**no**"


def build_rows(results: dict, args: argparse.Namespace) -> list[Row]:
    """The table: ratios are ours / reference; targets from docs/BENCHMARKS.md."""
    our_rate, raw_rate, _ = results["single"]
    ratio = our_rate / raw_rate
    rows = [Row("single-stream decode, tok/s (vs raw llama.cpp)", fmt(our_rate), fmt(raw_rate),
                f"{ratio:.2f}x", ">= 0.95x", ratio >= 0.95)]
    for clients in args.clients:
        (rate, worst, *_), (peer_rate, peer_worst, *_) = results["ours", clients], results["peer", clients]
        final = clients == 8  # the targets are set for eight simultaneous users
        who = f"{clients} client{'s' if clients > 1 else ''}"
        rows.append(Row(f"{who}: aggregate tok/s (vs llama_cpp.server)", fmt(rate), fmt(peer_rate),
                        f"{rate / peer_rate:.2f}x", ">= 1.5x" if final else "",
                        rate / peer_rate >= 1.5 if final else None))
        rows.append(Row(f"{who}: worst first token, s", fmt(worst), fmt(peer_worst),
                        f"{worst / peer_worst:.2f}x", "ours <= 2 s" if final else "",
                        worst <= 2.0 if final else None))
    first, last, _ = results["turns"]
    rows.append(Row(f"first token, turn {args.turns} (ours) vs turn 1 (reference), s", fmt(last),
                    fmt(first), f"{last / first:.2f}x", "<= 1.3x", last / first <= 1.3))
    if "server_turns" in results:
        rows += server_rows(results, args)
    spec = results["speculation"]
    ratio = spec["copy"] / spec["raw"]
    rows.append(Row("copy prompt, one stream, drafts: decode tok/s (vs raw llama.cpp)", fmt(spec["copy"]),
                    fmt(spec["raw"]), f"{ratio:.2f}x", ">= 1.3x", ratio >= 1.3))
    rows.append(Row("copy prompt, one stream: drafts vs no drafts, tok/s (same output: "
                    f"{'yes' if spec['same'] else 'no'})", fmt(spec["copy"]), fmt(spec["copy_plain"]),
                    f"{spec['copy'] / spec['copy_plain']:.2f}x", "", None))
    rows.append(Row("free chat, one stream: drafts vs no drafts, tok/s", fmt(spec["chat"]), fmt(spec["chat_plain"]),
                    f"{spec['chat'] / spec['chat_plain']:.2f}x", ">= 0.97x", spec["chat"] / spec["chat_plain"] >= 0.97))
    plain, offered = results["tools"]["plain"][0], results["tools"]["tools"][0]
    rows.append(Row("tools offered, text answer: decode tok/s (vs plain turn, same prompt)", fmt(offered),
                    fmt(plain), f"{offered / plain:.2f}x", ">= 0.95x", offered / plain >= 0.95))
    return rows


def server_rows(results: dict, args: argparse.Namespace) -> list[Row]:
    """Ours against llama-server: at least 1.0x on every row is the aim (first tokens: ours / theirs <= 1.0)."""
    rows = []
    for clients in args.clients:
        (rate, _, _, median), (their_rate, _, _, their_median) = results["ours", clients], results["server", clients]
        who = f"{clients} client{'s' if clients > 1 else ''}"
        rows.append(Row(f"{who}: aggregate tok/s (vs llama-server)", fmt(rate), fmt(their_rate),
                        f"{rate / their_rate:.2f}x", ">= 1.0x", rate / their_rate >= 1.0))
        rows.append(Row(f"{who}: median first token, s (vs llama-server)", fmt(median), fmt(their_median),
                        f"{median / their_median:.2f}x", "<= 1.0x", median / their_median <= 1.0))
    (first, last, _), (their_first, their_last) = results["turns"], results["server_turns"]
    ours, theirs = last / first, their_last / their_first
    rows.append(Row(f"first token turn {args.turns} / turn 1 (vs llama-server's)", f"{ours:.2f}", f"{theirs:.2f}",
                    f"{ours / theirs:.2f}x", "<= 1.0x", ours / theirs <= 1.0))
    # The ratio above also moves with turn 1 (a faster turn 1 raises it): what a user waits for at turn 10 is this.
    rows.append(Row(f"first token at turn {args.turns}, s (vs llama-server)", fmt(last), fmt(their_last),
                    f"{last / their_last:.2f}x", "<= 1.0x", last / their_last <= 1.0))
    mine, its, length = results["long"]
    rows.append(Row(f"first token of a new {length}-token prompt, s (vs llama-server)", fmt(mine), fmt(its),
                    f"{mine / its:.2f}x", "<= 1.0x", mine / its <= 1.0))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| measurement | ours | reference | ratio | target | met? |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.measurement} | {r.ours} | {r.reference} | {r.ratio} | {r.target or '—'} | {verdict(r.met)} |"
              for r in rows]
    return "\n".join(lines)


def notes(results: dict, args: argparse.Namespace, model: str, quiet: Quiet) -> str:
    """What the reader needs to trust the table: answer lengths, model, threads, how busy the machine was."""
    def lengths(side: str) -> list[int]:  # keys are ("ours" | "peer", clients), or "single" / "turns" (ours)
        return [n for key, value in results.items() if isinstance(key, tuple) or key in ("single", "turns")
                if (key[0] if isinstance(key, tuple) else "ours") == side for n in value[2]]


    ours_counts, peer_counts, server_counts = lengths("ours"), lengths("peer"), lengths("server")
    server = (f", llama-server {min(server_counts)}-{max(server_counts)}" if server_counts else
              " (llama-server not measured)")
    check = results.get("server_check")
    same = "" if not server_counts else (f" llama-server input check: {check}." if check else
                                         " llama-server reads the same tokens and writes the same greedy answer.")
    return (f"tokens per answer (asked {args.tokens}): ours {min(ours_counts)}-{max(ours_counts)}, "
            f"llama_cpp.server {min(peer_counts)}-{max(peer_counts)}{server}.{same} "
            f"Model {model}, {args.threads} threads, "
            f"best of {args.reps} repetition(s). Other processes kept up to {quiet.worst_kept:.2f} of "
            f"{os.cpu_count()} CPUs busy during the runs kept ({quiet.repeated} disturbed runs repeated).")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if missing_peer_modules():
        print(f"bench: llama_cpp.server needs {', '.join(missing_peer_modules())}: "
              "pip install 'llama-cpp-python[server]' (the wheel already built is reused)", file=sys.stderr)
        return 2
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter
    # `timeout` and CI send SIGTERM: exit through the finally blocks so both servers are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    settings = load_settings(None, {"LLM_CPU_THREADS": args.threads})
    spec = ModelSpecs(settings)()
    layers = gpu_layers(settings.gpu_layers)  # every side gets the same (raw llama.cpp through settings)
    before = os.getloadavg()[0]
    print(f"bench: {spec.path}, {args.threads} threads, {layers} GPU layers (-1: all), load average {before:.2f}",
          file=sys.stderr)
    raw = RawLlama(spec, settings)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-personalities-") as directory:
            write_personality(Path(directory), SYSTEM, args.tokens)
            # Both servers stay up (idle ones use no CPU) so their runs can be interleaved.
            with contextlib.ExitStack() as servers:
                ours = servers.enter_context(our_server(spec.path, args.threads, Path(directory), layers))
                peer = servers.enter_context(peer_server(spec.path, args.threads, spec.context_window, layers))
                server = None if args.no_llama_server else servers.enter_context(
                    llama_server(spec.path, args.threads, spec.context_window, settings.parallel, layers))
                quiet = Quiet([os.getpid(), *(s.process.pid for s in (ours, peer, server) if s is not None)])
                results = measure(ours, peer, server, raw, quiet, args)
    finally:
        raw.close()
    print(markdown(build_rows(results, args)))
    print("\n" + notes(results, args, Path(spec.path).name, quiet) + f" GPU layers on every side: {layers}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
