"""The service: ``create_app(config, engine)`` wires settings, engine, personalities and routes.

``python app.py`` serves on HOST:PORT (default 127.0.0.1:5000) on the asyncio server of ``llm.web.server`` (uvicorn),
which ``make run``, ``make serve`` and the Docker image all use. ``python app.py --help`` lists every setting.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask

from llm.conversation.service import ChatService
from llm.conversation.store import RetentionSweeper, SqlConversationStore
from llm.engine import Engine
from llm.engine.embeddings import Embeddings
from llm.errors import ConfigError
from llm.knowledge.backends import is_postgres
from llm.knowledge.documents import Limits
from llm.knowledge.index import KnowledgeIndex
from llm.models import ModelSpec, resolve
from llm.personalities import ModelChoice, Personality, PersonalityRegistry
from llm.settings import SETTINGS, Settings, load_settings, settings_help_text
from rag.preprocess import Preprocessor

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("llm")


class ModelSpecs:
    """Resolves each personality's model once (downloads and assembly are slow) and remembers it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._cache: dict[ModelChoice, ModelSpec] = {}
        self._lock = threading.Lock()

    def __call__(self, personality: Personality | None = None) -> ModelSpec:
        choice = personality.model if personality is not None else ModelChoice()
        with self._lock:
            if choice not in self._cache:
                self._cache[choice] = resolve(choice, self.settings)
            return self._cache[choice]


@dataclass
class Services:
    """The long-lived objects of one app, kept in ``app.extensions['llm']``."""

    settings: Settings
    engine: Engine
    personalities: PersonalityRegistry
    specs: ModelSpecs
    chat: ChatService
    store: Any
    preprocessor: Any
    embeddings: Embeddings
    knowledge: KnowledgeIndex


def _split_config(config: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings (the table's variables) versus Flask's own keys (TESTING, ...)."""
    config = dict(config or {})
    names = {setting.env for setting in SETTINGS}
    settings = {key: value for key, value in config.items() if key in names}
    flask = {key: value for key, value in config.items() if key not in settings}
    return settings, flask


def create_app(config: dict[str, Any] | None = None, engine: Engine | None = None) -> Flask:
    """Build the app: defaults, then the environment, then ``config``; ``engine`` replaces the real one."""
    setting_values, flask_values = _split_config(config)
    settings = load_settings(os.environ, setting_values)
    app = Flask(__name__, static_folder=str(ROOT / "static"), static_url_path="/static")
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, MAX_FORM_MEMORY_SIZE=settings.max_body_bytes)
    app.config.update(flask_values)

    directory = Path(settings.personalities_dir)
    personalities = PersonalityRegistry(directory if directory.is_absolute() else ROOT / directory)
    specs = ModelSpecs(settings)
    if engine is None:
        from llm.engine.router import EngineRouter

        engine = EngineRouter(settings)
        engine.preload(specs())
    store = SqlConversationStore(settings.database_url or
                                 f"sqlite:///{Path(settings.data_dir).expanduser() / 'conversations.db'}",
                                 settings.max_conversations_per_user)
    if settings.retention_days > 0:
        RetentionSweeper(store, engine, settings.retention_days).start()
    embeddings = Embeddings(settings, lambda: specs().path)
    knowledge = KnowledgeIndex(settings.database_url if is_postgres(settings.database_url)  # replicas share it
                               else str(Path(settings.data_dir).expanduser() / "knowledge.db"), embeddings,
                               Limits(max_bytes=settings.knowledge_max_file_bytes), settings.knowledge_quota_bytes)
    preprocessor = Preprocessor(settings, library=knowledge)
    chat = ChatService(engine, personalities, store, specs, preprocessor,
                       max_prompt_tokens=settings.max_prompt_tokens)
    app.extensions["llm"] = Services(settings, engine, personalities, specs, chat, store, preprocessor, embeddings,
                                     knowledge)

    from llm.web import auth, guard, limits
    from llm.web.api import anthropic, embeddings, gpt, history, knowledge, openai, pages, toil
    from llm.web.api.answers import Answers
    from llm.web.api.errors import register_error_handlers
    from llm.web.api.socket import SocketRegistry

    register_error_handlers(app)
    guard.install(app, settings)
    auth.install(app, settings)
    limits.install(app, settings)  # after authentication: the budget is charged to the user it found
    app.register_blueprint(history.blueprint)
    app.register_blueprint(pages.blueprint)
    app.register_blueprint(gpt.blueprint)
    app.register_blueprint(toil.blueprint)
    app.register_blueprint(openai.blueprint)
    app.register_blueprint(anthropic.blueprint)
    app.register_blueprint(embeddings.blueprint)
    app.register_blueprint(knowledge.blueprint)
    app.extensions["llm_sockets"] = SocketRegistry(settings.max_sockets_per_user,
                                                   settings.parallel + settings.queue_size + 8,
                                                   Answers(settings.resume_seconds))
    from llm.web.observability import install_observability

    install_observability(app)
    return app


def announce(app: Flask, server) -> None:
    """Once the model is loaded, say where to go, as the last line; if it cannot load, say why and stop."""
    llm = app.extensions["llm"]
    while llm.engine.stats().get("loading"):
        time.sleep(0.1)
    settings = llm.settings
    errors = llm.engine.stats().get("load_errors")
    if errors:
        source = ("LLM_MODEL_FILE" if settings.model_file else "LLM_HUGGINGFACE_REPO" if settings.huggingface_repo
                  else "the embedded model")
        for path, reason in errors.items():
            print(f"error: {source}: could not load {path}: {reason}", file=sys.stderr, flush=True)
        server.should_exit = True
        return
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else host
    print(f"\nReady: open http://{shown}:{settings.port}/ in your browser (Ctrl+C stops).", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Serve the app (``make run``, ``make serve``); the address to open is the last line printed."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip(), "\n")
        print(settings_help_text())
        return 0
    from llm.web.logs import configure_logging

    configure_logging()
    try:
        app = create_app()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from llm.web.server import serve

    print("Loading the model…", file=sys.stderr, flush=True)
    serve(app, on_started=lambda server: announce(app, server))
    return 2 if app.extensions["llm"].engine.stats().get("load_errors") else 0


if __name__ == "__main__":
    sys.exit(main())
