"""Shared fixtures: apps on a fake engine, the real embedded model (loaded once), live servers on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import create_app
from llm.engine.fake import FakeEngine
from llm.web.server import BackgroundServer

FIXTURES = Path(__file__).parent / "fixtures"
TEST_PERSONALITIES = FIXTURES / "personalities"


class LiveServer(BackgroundServer):
    """The real serving stack (``llm.web.server``) on 127.0.0.1 (random port), for websocket and browser tests."""


@pytest.fixture
def model_file(tmp_path) -> str:
    """A placeholder model path: fake-engine apps never load it."""
    path = tmp_path / "fake-model.gguf"
    path.write_bytes(b"GGUF")
    return str(path)


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_app(model_file, fake_engine, tmp_path):
    """Build a fake-engine app with extra config (its own SQLite database)."""

    def build(**config):
        base = {"TESTING": True, "LLM_MODEL_FILE": model_file, "LLM_PERSONALITIES_DIR": str(TEST_PERSONALITIES),
                "DATABASE_URL": f"sqlite:///{tmp_path / 'conversations.db'}", "LLM_DATA_DIR": str(tmp_path / "data")}
        return create_app({**base, **config}, engine=fake_engine)

    return build


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def live_fake(app):
    server = LiveServer(app)
    yield server
    server.close()


@pytest.fixture(scope="session")
def real_app(tmp_path_factory):
    """The real engine on the embedded model, loaded once per test session."""
    database = tmp_path_factory.mktemp("db") / "conversations.db"
    app = create_app({"TESTING": True, "LLM_PERSONALITIES_DIR": str(TEST_PERSONALITIES), "LLM_CONTEXT_WINDOW": 1024,
                      "DATABASE_URL": f"sqlite:///{database}", "LLM_DATA_DIR": str(database.parent / "data"),
                      "LLM_PARALLEL": 4, "LLM_CPU_THREADS": 2, "LLM_CACHE_TOKENS": 8192})
    yield app
    app.extensions["llm"].engine.close()


@pytest.fixture(scope="session")
def live_real(real_app):
    server = LiveServer(real_app)
    yield server
    server.close()


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on 127.0.0.1 for this test session (Debian's postgresql package)."""
    import os
    import shutil
    import socket
    import subprocess

    bindir = _postgres_bin()
    if bindir is None:
        pytest.fail("PostgreSQL is not installed: run `make test-deps` (Debian package postgresql)")
    import tempfile

    # Not under pytest's tmp dir: that is private to root, and the server runs as the postgres user.
    base = Path(tempfile.mkdtemp(prefix="llm-test-postgres-"))
    data = base / "data"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # initdb refuses to run as root: run the server as the postgres system user when we are root.
    runner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if runner:
        shutil.chown(base, "postgres")
    subprocess.run([*runner, str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*runner, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "log"),
                    "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*runner, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
