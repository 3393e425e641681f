"""The chat page, the chat directory, the personality list and descriptions, and the health check."""

from __future__ import annotations

import json
from pathlib import Path

from flask import Blueprint, current_app, jsonify, render_template_string, request, send_from_directory

from llm.web.api import services
from llm.web.auth import give_anonymous_identity

blueprint = Blueprint("pages", __name__)
LANGUAGES = ("en", "fr")  # static/locales/<lang>.json


@blueprint.get("/")
def index():
    return give_anonymous_identity(send_from_directory(current_app.static_folder, "index.html"))


@blueprint.get("/chat/<personality>")
def chat_with(personality: str):
    """The chat page opened on one personality (the reference design's address for it)."""
    services().personalities.get(personality)  # 404 for an unknown one
    return give_anonymous_identity(send_from_directory(current_app.static_folder, "index.html"))


DIRECTORY = """<!doctype html>
<html lang="{{ lang }}">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark"><title>{{ t["directory.title"] }} · {{ t["page.title"] }}</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml"><link rel="stylesheet" href="/static/style.css">
</head>
<body class="directory">
<main id="main">
<h1>{{ t["directory.heading"] }}</h1>
<ul class="directory-list">
{% for p in personalities %}
<li lang="{{ p.language }}"><a href="/chat/{{ p.name | urlencode }}">{{ p.name }}</a>
<p>{{ p.description }}</p><p class="model">{{ t["personality.model"] }}{{ p.model }}</p></li>
{% endfor %}
</ul>
</main>
</body>
</html>"""


@blueprint.get("/chat")
def chat_directory():
    """Every personality with a link to chat with it (Jinja escapes what personality files say), in the
    browser's language when the page speaks it (the chat page's own catalogue)."""
    lang = request.accept_languages.best_match(LANGUAGES, default="en")
    with open(Path(current_app.static_folder) / "locales" / f"{lang}.json", encoding="utf-8") as file:
        words = json.load(file)
    return render_template_string(DIRECTORY, personalities=describe_all(), lang=lang, t=words)


def describe(personality) -> dict:
    """What clients may know of a personality: its public fields and the model that serves it."""
    llm = services()
    spec = llm.specs(personality)
    return {**personality.public(), "model": llm.engine.describe(spec)["name"], "context_window": spec.context_window}


def describe_all() -> list[dict]:
    return [describe(personality) for personality in services().personalities.all()]


@blueprint.get("/personalities")
def personalities():
    """Each personality with its description, intro and the model that serves it."""
    return jsonify({"personalities": describe_all()})


@blueprint.get("/describe/<personality>")
def describe_one(personality: str):
    """One personality (the reference design's /describe): name, description, intro, language, model."""
    return jsonify(describe(services().personalities.get(personality)))


@blueprint.get("/health")
def health():
    """200 when the default model is loaded and the scheduler is responsive, else 503 with the reason."""
    llm = services()
    stats = llm.engine.stats()
    spec = llm.specs()
    info = llm.engine.describe(spec)
    if stats.get("load_errors"):
        return jsonify({"status": "error", "model": spec.name, "errors": stats["load_errors"]}), 503
    if not info.get("loaded"):
        return jsonify({"status": "loading", "model": spec.name}), 503
    model_stats = stats.get("models", {}).get(spec.name, {})
    stuck = model_stats.get("active_sequences", 0) > 0 and model_stats.get("last_step_age", 0) > 60
    if stuck:
        return jsonify({"status": "stuck", "model": spec.name, "engine": model_stats}), 503
    return jsonify({"status": "ok", "model": spec.name, "engine": model_stats})

