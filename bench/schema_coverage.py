"""Schema coverage: which JSON Schemas each constraint engine accepts and enforces, and what compiling costs.

Offline (default): every schema of the JSON-Schema-Test-Suite (draft 2020-12, plus optional/format) goes through
our compiler (llguidance) and through llama.cpp's JSON-Schema-to-GBNF converter plus llama.cpp's grammar parser.
The llama.cpp side runs in a child process, one schema at a time, so a C++ abort counts as a failure instead of
ending the benchmark. For each accepted schema the suite's instances (compact JSON) are fed token by token:
"exact" means every valid instance matched and every invalid one was refused (silently ignored keywords show
up there). Prints a table per file, the totals and compile times.

Online (``--endpoint URL``): POSTs every suite schema to ``URL/toil/<personality>`` and reports the share
answered 200, the share of those answers that validate (the target is 100%), the statuses of the others and
the median / 95th percentile time per request.

    python bench/schema_coverage.py [--all] [--model PATH]
    python bench/schema_coverage.py --endpoint http://127.0.0.1:5000 --personality assistant --concurrency 4 --limit 40
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import select
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm.errors import ServiceError  # noqa: E402
from llm.schema_support import validate_output  # noqa: E402

DEFAULT_SUITE = Path(os.environ.get("JSON_SCHEMA_TEST_SUITE", "/work/shared/data/json-schema-test-suite"))
WORKER_TIMEOUT_S = 30.0


@dataclass
class Case:
    """One suite schema with its instances, each as its compact JSON spellings (key orders)."""

    file: str
    description: str
    schema: object
    valid: list[list[str]]
    invalid: list[list[str]]


@dataclass
class Outcome:
    """What one engine did with one schema."""

    accepted: bool
    reason: str = ""
    first_ms: float = 0.0
    cached_ms: float = 0.0
    valid_matched: int = 0
    invalid_refused: int = 0
    extra: dict = field(default_factory=dict)


def compact(value: object, schema_text: str, first: frozenset = frozenset(), spaced: bool = False) -> str:
    """JSON as grammars emit it: no spaces (or Python's default ", " and ": "), 1.0 as 1, keys in the order the
    schema names them (keys in ``first`` before the others)."""
    def order(node: object) -> object:
        if isinstance(node, dict):
            def position(key: str) -> tuple[bool, bool, int]:
                found = schema_text.find(json.dumps(key, ensure_ascii=False) + ":")
                return (key not in first, found < 0, found)
            return {key: order(node[key]) for key in sorted(node, key=position)}
        if isinstance(node, list):
            return [order(item) for item in node]
        return int(node) if isinstance(node, float) and node.is_integer() and abs(node) <= 2**53 else node

    return json.dumps(order(value), separators=(", ", ": ") if spaced else (",", ":"), ensure_ascii=False)


def spellings(value: object, schema: object) -> list[str]:
    """The instance in declared key order, with required keys first (llama.cpp's converter's order), and spaced
    (llama.cpp writes const and enum values that way): an engine matches an instance if it takes any spelling."""
    text = json.dumps(schema, ensure_ascii=False)
    required: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("required"), list):
                required.update(name for name in node["required"] if isinstance(name, str))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    first = frozenset(required)
    return list(dict.fromkeys([compact(value, text), compact(value, text, first), compact(value, text, first, True)]))


def load_cases(suite: Path, everything: bool) -> list[Case]:
    """The draft 2020-12 schemas: top-level files and optional/format (``everything``: all optional files)."""
    root = suite / "tests" / "draft2020-12"
    optional = "optional/**/*.json" if everything else "optional/format/*.json"
    paths = sorted(root.glob("*.json")) + sorted(root.glob(optional))
    cases = []
    for path in paths:
        for group in json.loads(path.read_text(encoding="utf-8")):
            texts: dict[bool, list[list[str]]] = {True: [], False: []}
            for test in group["tests"]:
                texts[test["valid"]].append(spellings(test["data"], group["schema"]))
            cases.append(Case(str(path.relative_to(root)), group["description"], group["schema"], texts[True],
                              texts[False]))
    return cases


def default_model() -> str:
    """The embedded model, assembled where the service keeps it."""
    from llm.models import embedded_model_path

    return embedded_model_path()


# ----- our compiler (in process) -------------------------------------------------------------------------------

def run_ours(cases: list[Case], model_path: str) -> list[Outcome]:
    """Compile every schema twice (first and cached) and feed its instances through the matcher."""
    import llama_cpp

    from llm.engine.constraints import ConstraintCompiler

    model = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
    compiler = ConstraintCompiler.for_llama_model(model)
    return [_ours_one(compiler, case) for case in cases]


def _ours_one(compiler, case: Case) -> Outcome:
    started = time.perf_counter()
    try:
        grammar = compiler.compile_json(case.schema)
    except ServiceError as exc:
        return Outcome(False, f"{exc.status} {exc.message}", first_ms=1e3 * (time.perf_counter() - started))
    first = time.perf_counter()
    compiler.compile_json(case.schema)
    cached = time.perf_counter()
    outcome = Outcome(True, first_ms=1e3 * (first - started), cached_ms=1e3 * (cached - first))
    outcome.valid_matched = sum(any(_matches(compiler, grammar, t) for t in texts) for texts in case.valid)
    outcome.invalid_refused = sum(not any(_matches(compiler, grammar, t) for t in texts) for texts in case.invalid)
    return outcome


def _matches(compiler, grammar, text: str) -> bool:
    state = grammar.new_state()
    try:
        for token in compiler.tokenizer.tokenize_str(text):
            state.accept(token)
    except ServiceError:
        return False
    return state.is_accepting()


# ----- llama.cpp's converter and grammar parser (child process) ------------------------------------------------

def run_llama(cases: list[Case], model_path: str) -> list[Outcome]:
    """Each schema through llama.cpp in a worker process; a crash or hang fails that schema and restarts it."""
    outcomes: list[Outcome] = []
    worker = None
    for case in cases:
        worker = worker or _start_worker(model_path)
        request = {"schema": case.schema, "valid": case.valid, "invalid": case.invalid}
        line = json.dumps(request, ensure_ascii=False) + "\n"
        reply = _ask(worker, line)
        if reply is None:
            outcomes.append(Outcome(False, "llama.cpp crashed or hung"))
            worker.kill()
            worker.wait()
            worker = None
            continue
        outcomes.append(Outcome(reply["ok"], reply.get("reason", ""), first_ms=reply.get("ms", 0.0),
                                valid_matched=reply.get("valid", 0), invalid_refused=reply.get("refused", 0)))
    if worker is not None:
        worker.stdin.close()
        worker.wait()
    return outcomes


def _start_worker(model_path: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--llama-worker", model_path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8")


def _ask(worker: subprocess.Popen, line: str) -> dict | None:
    """One request and its one-line reply, or None if the worker died or took too long."""
    try:
        worker.stdin.write(line)
        worker.stdin.flush()
    except BrokenPipeError:
        return None
    ready, _, _ = select.select([worker.stdout], [], [], WORKER_TIMEOUT_S)
    reply = worker.stdout.readline() if ready else ""
    return json.loads(reply) if reply else None


def llama_worker(model_path: str) -> None:
    """Child process: answer one JSON line per schema on stdout."""
    import llama_cpp

    model = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
    vocab = model._model.vocab
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(_llama_one(llama_cpp, model, vocab, request)), flush=True)


def _llama_one(llama_cpp, model, vocab, request: dict) -> dict:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    started = time.perf_counter()
    try:
        gbnf = json_schema_to_gbnf(json.dumps(request["schema"]))
    except Exception as exc:  # noqa: BLE001 - any converter failure is a refusal
        return {"ok": False, "reason": f"convert: {type(exc).__name__}: {str(exc)[:120]}"}
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    elapsed = 1e3 * (time.perf_counter() - started)
    if not sampler:
        return {"ok": False, "reason": "llama.cpp could not parse the grammar", "ms": elapsed}
    llama_cpp.llama_sampler_free(sampler)
    valid = sum(any(_gbnf_matches(llama_cpp, model, vocab, gbnf, t) for t in texts) for texts in request["valid"])
    refused = sum(not any(_gbnf_matches(llama_cpp, model, vocab, gbnf, t) for t in texts)
                  for texts in request["invalid"])
    return {"ok": True, "ms": elapsed, "valid": valid, "refused": refused}


def _gbnf_matches(llama_cpp, model, vocab, gbnf: str, text: str) -> bool:
    """Feed the text's tokens to a fresh grammar sampler; complete only if EOS is then allowed."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    try:
        for token in model.tokenize(text.encode(), add_bos=False, special=False):
            if not _allowed(llama_cpp, sampler, token):
                return False
            llama_cpp.llama_sampler_accept(sampler, token)
        return _allowed(llama_cpp, sampler, llama_cpp.llama_vocab_eos(vocab))
    finally:
        llama_cpp.llama_sampler_free(sampler)


def _allowed(llama_cpp, sampler, token: int) -> bool:
    data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
    array = llama_cpp.llama_token_data_array(data, 1, -1, False)
    llama_cpp.llama_sampler_apply(sampler, llama_cpp.ctypes.byref(array))
    return data[0].logit != float("-inf")


# ----- report --------------------------------------------------------------------------------------------------

def exact(case: Case, outcome: Outcome) -> bool:
    return (outcome.accepted and outcome.valid_matched == len(case.valid)
            and outcome.invalid_refused == len(case.invalid))


def share(part: int, whole: int) -> str:
    return f"{100 * part / whole:5.1f}%" if whole else "    -"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def print_table(cases: list[Case], ours: list[Outcome], llama: list[Outcome]) -> None:
    """Per-file and total acceptance and exactness for both engines, then compile times."""
    rows = collections.defaultdict(lambda: [0, 0, 0, 0, 0])
    for case, a, b in zip(cases, ours, llama, strict=True):
        row = rows[case.file]
        row[0] += 1
        row[1] += a.accepted
        row[2] += b.accepted
        row[3] += exact(case, a)
        row[4] += exact(case, b)
    print(f"{'file':40} {'schemas':>7} {'ours acc':>9} {'llama acc':>9} {'ours exact':>10} {'llama exact':>11}")
    for name, (n, oa, la, oe, le) in sorted(rows.items()):
        print(f"{name:40} {n:7d} {share(oa, n):>9} {share(la, n):>9} {share(oe, n):>10} {share(le, n):>11}")
    n, oa, la, oe, le = (sum(column) for column in zip(*rows.values(), strict=True))
    print(f"{'TOTAL':40} {n:7d} {share(oa, n):>9} {share(la, n):>9} {share(oe, n):>10} {share(le, n):>11}")
    _print_instances("ours", cases, ours)
    _print_instances("llama.cpp", cases, llama)
    _print_times(ours, llama)


def _print_instances(name: str, cases: list[Case], outcomes: list[Outcome]) -> None:
    pairs = [(c, o) for c, o in zip(cases, outcomes, strict=True) if o.accepted]
    valid = sum(len(c.valid) for c, _ in pairs)
    invalid = sum(len(c.invalid) for c, _ in pairs)
    print(f"{name:10} accepted schemas: valid instances matched {share(sum(o.valid_matched for _, o in pairs), valid)}"
          f", invalid instances refused {share(sum(o.invalid_refused for _, o in pairs), invalid)}")


def _print_times(ours: list[Outcome], llama: list[Outcome]) -> None:
    first = [o.first_ms for o in ours if o.accepted]
    cached = [1e3 * o.cached_ms for o in ours if o.accepted]
    converted = [o.first_ms for o in llama if o.accepted]
    print(f"ours compile, first: median {statistics.median(first):.2f} ms, p95 {percentile(first, .95):.2f} ms, "
          f"max {max(first):.2f} ms; cached: median {statistics.median(cached):.1f} µs")
    if converted:
        print(f"llama.cpp convert+parse: median {statistics.median(converted):.2f} ms, "
              f"p95 {percentile(converted, .95):.2f} ms (no cache)")


# ----- online mode ---------------------------------------------------------------------------------------------

def run_endpoint(cases: list[Case], args: argparse.Namespace) -> None:
    """POST every schema to a running server and check every 200 answer validates."""
    import requests

    url = f"{args.endpoint.rstrip('/')}/toil/{args.personality}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    session = requests.Session()

    def one(case: Case) -> tuple[int, bool, float, str]:
        started = time.perf_counter()
        response = session.post(url, json={"prompt": args.prompt, "schema": case.schema}, headers=headers,
                                timeout=args.timeout)
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            kind = response.json().get("error", {}).get("type", "?") if _is_json(response) else "not JSON"
            return response.status_code, False, elapsed, kind
        try:
            validate_output(case.schema, response.text)
            return 200, True, elapsed, ""
        except ServiceError as exc:
            return 200, False, elapsed, exc.message

    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        results = list(pool.map(one, cases))
    _print_endpoint(cases, results)


def _is_json(response) -> bool:
    try:
        response.json()
        return True
    except ValueError:
        return False


def _print_endpoint(cases: list[Case], results: list[tuple[int, bool, float, str]]) -> None:
    ok = [r for r in results if r[0] == 200]
    statuses = collections.Counter(f"{status} {kind}" for status, _, _, kind in results if status != 200)
    times = [r[2] for r in results]
    print(f"requests {len(results)}: 200 for {share(len(ok), len(results))}; of those valid "
          f"{share(sum(r[1] for r in ok), len(ok))} (target 100%)")
    print(f"time per request: median {statistics.median(times):.2f} s, p95 {percentile(times, .95):.2f} s")
    for status, count in statuses.most_common():
        print(f"  {count:4d} x {status}")
    for case, (status, valid, _, message) in zip(cases, results, strict=True):
        if status == 200 and not valid:
            print(f"  INVALID 200: {case.file}: {case.description}: {message[:150]}")


def serve_and_run(cases: list[Case], args: argparse.Namespace) -> None:
    """Run the online mode against our own service, started here on the embedded model."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _servers import our_server, write_personality

    from llm.settings import physical_cores

    with tempfile.TemporaryDirectory() as folder:
        write_personality(Path(folder), "You answer with JSON.", 256)
        with our_server(args.model or default_model(), physical_cores(), Path(folder)) as server:
            args.endpoint, args.personality = server.base, "bench"
            run_endpoint(cases, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", type=Path, default=DEFAULT_SUITE, help="JSON-Schema-Test-Suite checkout")
    parser.add_argument("--all", action="store_true", help="include every optional file, not only formats")
    parser.add_argument("--model", help="GGUF whose vocabulary is used (default: the embedded model)")
    parser.add_argument("--endpoint", help="base URL of a running server: benchmark /toil instead")
    parser.add_argument("--serve", action="store_true",
                        help="start the service on the embedded model and benchmark its /toil (greedy, 256 tokens)")
    parser.add_argument("--personality", default="assistant")
    parser.add_argument("--prompt", default="Produce an example value.")
    parser.add_argument("--api-key", default=os.environ.get("LLM_API_KEY"))
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--limit", type=int, default=0, help="use about this many schemas, spread over the files")
    parser.add_argument("--llama-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_worker:
        return llama_worker(args.llama_worker)
    cases = load_cases(args.suite, args.all)
    if args.limit and args.limit < len(cases):
        cases = cases[:: -(-len(cases) // args.limit)]  # an even spread over every file, for quick runs
    if args.serve:
        return serve_and_run(cases, args)
    if args.endpoint:
        return run_endpoint(cases, args)
    model = args.model or default_model()
    ours = run_ours(cases, model)
    llama = run_llama(cases, model)
    print_table(cases, ours, llama)


if __name__ == "__main__":
    main()
