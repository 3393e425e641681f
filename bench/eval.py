"""``make eval``: the quality of the default set-up, asked through the service's own endpoints.

Starts the service (the embedded model, or ``LLM_MODEL_FILE``) on a free loopback port with the shipped
personalities and asks one of them (``EVAL_PERSONALITY``, default ``assistant``): everyday questions on ``/gpt``
(an answer counts when it matches an accepted pattern), extractions on ``/toil`` (checked field by field), and
questions answerable only from a ``|CONTEXT|`` block. Prints accuracy per group, the share of answers that ended
by themselves (not at ``max_tokens``) and the time each group took. ``--quick`` asks five of each.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.eval_cases import CONTEXT, EVERYDAY, TOIL  # noqa: E402

PERSONALITY = os.environ.get("EVAL_PERSONALITY", "assistant")


def ask(url: str, prompt: str, ended: list[bool]) -> str:
    """The answer's text; whether it ended by itself (not at max_tokens) is appended to ``ended``."""
    response = requests.post(f"{url}/gpt/{PERSONALITY}", data={"prompt": prompt}, timeout=600)
    ended.append(response.headers.get("X-Finish-Reason") == "stop")
    return response.text if response.ok else ""


def everyday(url: str, cases, ended: list[bool]) -> list[bool]:
    return [re.search(pattern, ask(url, question, ended), re.IGNORECASE) is not None for question, pattern in cases]


def extraction(url: str, cases, ended: list[bool]) -> list[float]:
    """The share of fields right in each answer (0 for an error)."""
    scores = []
    for text, schema, expected in cases:
        response = requests.post(f"{url}/toil/{PERSONALITY}", json={"prompt": "Extract the fields from the text.",
                                                                "text": text, "schema": schema}, timeout=600)
        value = response.json() if response.ok else {}
        ended.append(response.ok)
        right = sum(_same(value.get(name), wanted) for name, wanted in expected.items())
        scores.append(right / len(expected))
    return scores


def _same(got, wanted) -> bool:
    if isinstance(wanted, str):
        return isinstance(got, str) and got.strip().casefold() == wanted.casefold()
    return got == wanted


def in_context(url: str, cases, ended: list[bool]) -> list[bool]:
    return [re.search(pattern, ask(url, f"|CONTEXT|{fact}|/CONTEXT|{question}", ended), re.IGNORECASE) is not None
            for fact, question, pattern in cases]


def run(url: str, quick: bool = False) -> list[tuple[str, int, float, float, float]]:
    """(group, cases, accuracy, share of answers that ended by themselves, seconds) for each group."""
    limit = 5 if quick else None
    rows = []
    for name, runner, cases in (("everyday questions", everyday, EVERYDAY), ("/toil extraction", extraction, TOIL),
                                ("|CONTEXT| questions", in_context, CONTEXT)):
        started, ended = time.monotonic(), []
        scores = runner(url, cases[:limit], ended)
        rows.append((name, len(scores), sum(scores) / len(scores), sum(ended) / len(ended),
                     time.monotonic() - started))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="five cases of each group")
    args = parser.parse_args()
    os.environ.setdefault("LLM_DATA_DIR", tempfile.mkdtemp(prefix="llm-eval-"))
    from app import create_app
    from llm.web.server import BackgroundServer

    app = create_app()
    server = BackgroundServer(app)
    try:
        while requests.get(server.url + "/health", timeout=30).status_code != 200:
            time.sleep(0.5)
        model = app.extensions["llm"].specs().name
        rows = run(server.url, args.quick)
    finally:
        server.close()
        app.extensions["llm"].engine.close()
    print(f"\nModel: {model}\n")
    print("| group | cases | accuracy | ended by themselves | time |")
    print("|---|---|---|---|---|")
    for name, count, accuracy, ended, seconds in rows:
        print(f"| {name} | {count} | {accuracy:.0%} | {ended:.0%} | {seconds:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
