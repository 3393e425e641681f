"""``make audit``: start the service on free loopback ports with keyed users, run every multi-user safety probe
against it, and print a table probe / expected / observed.

The service is started the two ways users start it: ``python app.py`` (what ``make run`` runs) and ``make serve``;
both are the same asyncio server (``llm.web.server``), so the table shows the same probes twice. Rate-limit probes
run against two more instances with ``LLM_RATE_LIMIT`` set (anonymous and keyed). Every connection stays on
127.0.0.0/8. Exit status 1 when any probe fails.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from audit import probes  # noqa: E402

PERSONALITIES = ROOT / "tests" / "fixtures" / "personalities"
HEADER_TIMEOUT, PER_ADDRESS = 3, 64


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Service:
    """One service process on a free port, its log captured to a file."""

    def __init__(self, command: list[str], name: str, **settings: str):
        self.name, self.port = name, free_port()
        self.data = Path(tempfile.mkdtemp(prefix="llm-audit-"))
        self.log_path = self.data / "service.log"
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "LLM_DATA_DIR": str(self.data),
               "LLM_PERSONALITIES_DIR": str(PERSONALITIES), "LLM_CONTEXT_WINDOW": "2048", "LLM_PARALLEL": "4",
               "LLM_HEADER_TIMEOUT": str(HEADER_TIMEOUT), "LLM_MAX_CONNECTIONS_PER_ADDRESS": str(PER_ADDRESS),
               **settings}
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready()

    def _wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f} s")

    def target(self) -> probes.Target:
        return probes.Target(self.url, "greedy", header_timeout=HEADER_TIMEOUT, connections_per_address=PER_ADDRESS)

    def stop(self) -> str:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        return self.log_path.read_text(errors="replace")


def secrets_in_log(log: str) -> probes.Row:
    keys = [entry.partition(":")[2] for entry in probes.KEYS.split(",")]
    lines = [line for line in log.splitlines() if any(key in line.split() or f"={key}" in line or f":{key}" in line
                                                      for key in keys)]
    return probes.Row("API keys in the service's log", "0 lines", f"{len(lines)} lines", not lines)


def wal_mode(service: Service) -> probes.Row:
    with sqlite3.connect(service.data / "conversations.db") as connection:
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    return probes.Row("SQLite journal mode", "wal", mode, mode == "wal")


def audit_service(name: str, command: list[str]) -> list[tuple[str, probes.Row]]:
    service = Service(command, name, LLM_API_KEYS=probes.KEYS)
    rows: list[tuple[str, probes.Row]] = []
    try:
        target = service.target()
        for probe in (probes.redos, probes.connections, probes.cache_isolation, probes.special_tokens,
                      probes.keys_out_of_urls, probes.hosts_and_origins, probes.conversation_ids,
                      probes.storage_growth, probes.trickled_body, probes.wrong_keys_throttled):
            rows += [(name, row) for row in probe(target)]
        rows.append((name, wal_mode(service)))
    finally:
        log = service.stop()
    rows.append((name, secrets_in_log(log)))
    return rows


def audit_rate_limits(command: list[str]) -> list[tuple[str, probes.Row]]:
    rows = []
    anonymous = Service(command, "rate limit, no keys", LLM_RATE_LIMIT="6/minute")
    try:
        made_up = lambda index: {"X-API-Key": f"made-up-{index}"}  # noqa: E731
        rows += [("anonymous", row) for row in probes.rate_budget(anonymous.target(), 6, made_up)]
    finally:
        anonymous.stop()
    keyed = Service(command, "rate limit, keys", LLM_RATE_LIMIT="6/minute", LLM_API_KEYS=probes.KEYS)
    try:
        rows += [("keyed", row) for row in probes.rate_budget(keyed.target(), 6, lambda index: probes.ALICE)]
    finally:
        keyed.stop()
    return rows


def print_table(rows: list[tuple[str, probes.Row]]) -> None:
    print("| server | probe | expected | observed | |")
    print("|---|---|---|---|---|")
    for server, row in rows:
        print(f"| {server} | {row.probe} | {row.expected} | {row.observed} | {'ok' if row.passed else 'FAIL'} |")


def main() -> int:
    development = [sys.executable, "app.py"]
    production = ["make", "--no-print-directory", "serve", f"PY={sys.executable}"]
    rows = audit_service("python app.py (make run)", development)
    rows += audit_service("make serve", production)
    rows += audit_rate_limits(development)
    print_table(rows)
    failed = [row for _, row in rows if not row.passed]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
