"""The chat page, the personality list and the health check."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, send_from_directory

blueprint = Blueprint("pages", __name__)


def services():
    return current_app.extensions["llm"]


@blueprint.get("/")
def index():
    return send_from_directory(current_app.static_folder, "index.html")


@blueprint.get("/personalities")
def personalities():
    """Each personality with its description, intro and the model that serves it."""
    llm = services()
    items = []
    for personality in llm.personalities.all():
        spec = llm.specs(personality)
        items.append({**personality.public(), "model": llm.engine.describe(spec)["name"],
                      "context_window": spec.context_window})
    return jsonify({"personalities": items})


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

