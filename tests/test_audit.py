"""The multi-user safety audit's probes (``make audit``) as tests, against the real serving stack on 127.0.0.1.

Probes that only need the web layer run on the fake engine; those about the engine itself (cached prefixes,
special tokens, schema validation of real answers) run on the embedded model.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from audit import probes
from tests.conftest import TEST_PERSONALITIES, LiveServer

AUDIT_SETTINGS = {"LLM_API_KEYS": probes.KEYS, "LLM_HEADER_TIMEOUT": 2, "LLM_MAX_CONNECTIONS_PER_ADDRESS": 64}


def run(probe, target: probes.Target) -> None:
    failed = [row for row in probe(target) if not row.passed]
    assert not failed, "\n".join(f"{row.probe}: expected {row.expected}, observed {row.observed}" for row in failed)


@pytest.fixture
def audited(make_app):
    server = LiveServer(make_app(**AUDIT_SETTINGS))
    yield server, probes.Target(server.url, "greedy", header_timeout=2, connections_per_address=64)
    server.close()


@pytest.mark.parametrize("probe", [probes.connections, probes.keys_out_of_urls, probes.wrong_keys_throttled,
                                   probes.hosts_and_origins, probes.conversation_ids, probes.storage_growth,
                                   probes.trickled_body],
                         ids=lambda probe: probe.__name__)
def test_web_layer_probe(audited, probe):
    run(probe, audited[1])


def test_redos_probe_on_scripted_answers(audited, fake_engine):
    """The validator sees the answer that makes backtracking regex engines take minutes."""
    fake_engine.script([json.dumps(probes.BAIT)])
    fake_engine.script([json.dumps({probes.BAIT: 1})])
    fake_engine.script([json.dumps(probes.BAIT)])
    run(probes.redos, audited[1])


def test_one_budget_across_http_and_websocket_even_with_made_up_keys(make_app):
    """No keys configured: each request invents an X-API-Key, and still all draw on the address's budget."""
    server = LiveServer(make_app(LLM_RATE_LIMIT="6/minute"))
    try:
        run(lambda target: probes.rate_budget(target, 6, lambda index: {"X-API-Key": f"made-up-{index}"}),
            probes.Target(server.url, "greedy"))
    finally:
        server.close()


def test_one_budget_per_keyed_user(make_app):
    server = LiveServer(make_app(LLM_RATE_LIMIT="6/minute", **AUDIT_SETTINGS))
    try:
        run(lambda target: probes.rate_budget(target, 6, lambda index: probes.ALICE),
            probes.Target(server.url, "greedy"))
        # bob's budget is his own
        assert server.app.test_client().get("/conversations", headers=probes.BOB).status_code == 200
    finally:
        server.close()


def test_sqlite_runs_in_wal_mode(app, tmp_path):
    with sqlite3.connect(Path(tmp_path) / "conversations.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.fixture(scope="module")
def real_audited(tmp_path_factory):
    from app import create_app

    database = tmp_path_factory.mktemp("audit") / "conversations.db"
    app = create_app({"TESTING": True, "LLM_PERSONALITIES_DIR": str(TEST_PERSONALITIES), "LLM_CONTEXT_WINDOW": 1024,
                      "DATABASE_URL": f"sqlite:///{database}", "LLM_PARALLEL": 4, "LLM_CPU_THREADS": 2,
                      **AUDIT_SETTINGS})
    server = LiveServer(app)
    yield probes.Target(server.url, "greedy")
    server.close()
    app.extensions["llm"].engine.close()


@pytest.mark.integration
@pytest.mark.parametrize("probe", [probes.cache_isolation, probes.special_tokens, probes.redos],
                         ids=lambda probe: probe.__name__)
def test_engine_probe_on_the_real_model(real_audited, probe):
    run(probe, real_audited)
