"""Shared fixtures: apps on a fake engine, the real embedded model (loaded once), live servers on 127.0.0.1."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from app import create_app
from llm.fake import FakeEngine

FIXTURES = Path(__file__).parent / "fixtures"
TEST_PERSONALITIES = FIXTURES / "personalities"


class LiveServer:
    """A real threaded server on 127.0.0.1 (random port) running an app, for websocket and browser tests."""

    def __init__(self, app):
        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
def make_app(model_file, fake_engine):
    """Build a fake-engine app with extra config."""

    def build(**config):
        base = {"TESTING": True, "LLM_MODEL_FILE": model_file, "LLM_PERSONALITIES_DIR": str(TEST_PERSONALITIES)}
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
def real_app():
    """The real engine on the embedded model, loaded once per test session."""
    app = create_app({"TESTING": True, "LLM_PERSONALITIES_DIR": str(TEST_PERSONALITIES), "LLM_CONTEXT_WINDOW": 1024,
                      "LLM_PARALLEL": 4, "LLM_CPU_THREADS": 2, "LLM_CACHE_TOKENS": 8192})
    yield app
    app.extensions["llm"].engine.close()


@pytest.fixture(scope="session")
def live_real(real_app):
    server = LiveServer(real_app)
    yield server
    server.close()
