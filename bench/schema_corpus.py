"""Real-world schemas: the JSON Schema Store schemas that ``check-jsonschema`` (PyPI) vendors, side by side.

For each schema: our compiler (exact grammar, superset grammar with what it loosened, or refused and why), then
llama.cpp's ``json_schema_to_gbnf`` (converted, parsed by llama.cpp's grammar parser). With ``--answer``, each
schema the service accepts is answered through ``/toil`` on the default model and the answer validated again
here; llama.cpp's grammar, where it parsed, generates an answer on the same model, validated the same way (so
"would its output validate" is measured, not assumed). Prints one row per schema and the totals.

    python bench/schema_corpus.py [--answer] [--max-tokens 256] [--timeout 60]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llm.errors import ServiceError  # noqa: E402
from llm.schema_support import validate_output  # noqa: E402

PROMPT = "Write a small, realistic example document."


def corpus() -> list[tuple[str, dict]]:
    """(name, schema) for every schema check-jsonschema ships (vendored and its own)."""
    base = resources.files("check_jsonschema") / "builtin_schemas"
    found = []
    for folder in ("vendor", "custom"):
        for entry in sorted((base / folder).iterdir(), key=lambda item: item.name):
            if entry.name.endswith(".json"):
                found.append((entry.name[:-5], json.loads(entry.read_text(encoding="utf-8"))))
    return found


def ours(schemas: list[tuple[str, dict]], compiler) -> list[str]:
    """Our compiler's verdict per schema: exact, superset (what was loosened) or refused (status and why)."""
    verdicts = []
    for _, schema in schemas:
        try:
            grammar = compiler.compile_json(schema)
        except ServiceError as error:
            verdicts.append(f"refused {error.status}: {error.message[:70]}")
            continue
        verdicts.append("superset: " + "; ".join(r[:40] for r in grammar.loosened) if grammar.loosened else "exact")
    return verdicts


def llama_side(schemas: list[tuple[str, dict]], model_path: str, answer: list[bool], max_tokens: int) -> list[dict]:
    """llama.cpp's converter and parser per schema, in a child process (a C++ abort fails only that schema);
    an answer under its grammar where ``answer`` says (the schemas our service answers, for a fair comparison)."""
    import subprocess

    results = []
    for (_, schema), wanted in zip(schemas, answer, strict=True):
        request = json.dumps({"schema": schema, "answer": wanted, "max_tokens": max_tokens})
        try:
            done = subprocess.run([sys.executable, __file__, "--llama-worker", model_path], input=request,
                                  capture_output=True, text=True, timeout=300)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        except (subprocess.TimeoutExpired, IndexError, ValueError):
            results.append({"converted": False, "reason": "crashed or hung"})
    return results


def llama_worker(model_path: str) -> None:
    """Child process: one schema on stdin; converted? parsed? and, if asked, an answer under the grammar."""
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

    request = json.loads(sys.stdin.read())
    try:
        gbnf = json_schema_to_gbnf(json.dumps(request["schema"]))
    except Exception as exc:  # noqa: BLE001 - any converter failure is a refusal
        print(json.dumps({"converted": False, "reason": f"{type(exc).__name__}: {str(exc)[:60]}"}))
        return
    model = llama_cpp.Llama(model_path, n_ctx=4096, n_threads=2, verbose=False)
    if not llama_cpp.llama_sampler_init_grammar(model._model.vocab, gbnf.encode(), b"root"):
        print(json.dumps({"converted": True, "parsed": False}))
        return
    result = {"converted": True, "parsed": True}
    if request["answer"]:
        text = model.create_chat_completion([{"role": "user", "content": PROMPT}], temperature=0,
                                            max_tokens=request["max_tokens"],
                                            grammar=LlamaGrammar.from_string(gbnf, verbose=False))
        result["valid"] = _validates(request["schema"], text["choices"][0]["message"]["content"] or "")
    print(json.dumps(result))


def _validates(schema: dict, text: str) -> bool:
    try:
        validate_output(schema, text)
        return True
    except ServiceError:
        return False


def answers(schemas: list[tuple[str, dict]], verdicts: list[str], args) -> list[str]:
    """Each accepted schema answered through /toil on the default model; every 200 validated again here."""
    from app import create_app
    from llm.web.server import BackgroundServer

    app = create_app({"LLM_DATA_DIR": tempfile.mkdtemp(prefix="llm-corpus-")})
    server = BackgroundServer(app)
    outcomes = []
    try:
        while requests.get(server.url + "/health", timeout=30).status_code != 200:
            time.sleep(0.5)
        for (_, schema), verdict in zip(schemas, verdicts, strict=True):
            if verdict.startswith("refused"):
                outcomes.append("-")
                continue
            response = requests.post(f"{server.url}/toil/assistant", timeout=args.timeout + 30, json={
                "prompt": PROMPT, "schema": schema, "max_tokens": args.max_tokens, "timeout": args.timeout})
            if response.status_code == 200:
                outcomes.append("200 valid" if _validates(schema, response.text) else "200 INVALID")
            else:
                outcomes.append(f"{response.status_code} {response.json()['error']['message'][:50]}")
    finally:
        server.close()
        app.extensions["llm"].engine.close()
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answer", action="store_true", help="also answer each schema on the default model")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--llama-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_worker:
        llama_worker(args.llama_worker)
        return 0
    from llm.engine.constraints import ConstraintCompiler
    from llm.models import embedded_model_path

    model_path = embedded_model_path()
    import llama_cpp

    vocab_model = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
    schemas = corpus()
    verdicts = ours(schemas, ConstraintCompiler.for_llama_model(vocab_model))
    accepted = [args.answer and not verdict.startswith("refused") for verdict in verdicts]
    llama = llama_side(schemas, model_path, accepted, args.max_tokens)
    served = answers(schemas, verdicts, args) if args.answer else ["-"] * len(schemas)
    print("| schema | size | ours | our /toil answer | llama.cpp GBNF | its answer |")
    print("|---|---|---|---|---|---|")
    for (name, schema), verdict, answer, other in zip(schemas, verdicts, served, llama, strict=True):
        size = len(json.dumps(schema, separators=(",", ":")))
        gbnf = ("converted, parsed" if other.get("parsed") else "converted, NOT parsed" if other.get("converted")
                else f"refused: {other.get('reason', '')[:40]}")
        theirs = "-" if "valid" not in other else "valid" if other["valid"] else "INVALID"
        print(f"| {name} | {size // 1024} kB | {verdict} | {answer} | {gbnf} | {theirs} |")
    counts = collections.Counter(v.split(":")[0] for v in verdicts)
    print(f"\nours: {dict(counts)}; /toil 200s that validate: {sum(a == '200 valid' for a in served)}, "
          f"invalid 200s: {sum(a == '200 INVALID' for a in served)}")
    print(f"llama.cpp: converted {sum(bool(o.get('converted')) for o in llama)}, parsed "
          f"{sum(bool(o.get('parsed')) for o in llama)}, answers that validate "
          f"{sum(bool(o.get('valid')) for o in llama)} of {sum('valid' in o for o in llama)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
