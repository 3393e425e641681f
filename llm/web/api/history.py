"""Conversation history for its owner: list, read, rename, delete, export, and feedback on answers."""

from __future__ import annotations

import json
import re

from flask import Blueprint, Response, jsonify, request

from llm.conversation.turns import Conversation
from llm.errors import BadRequest, NotFound
from llm.web.api import services
from llm.web.auth import current_user

blueprint = Blueprint("history", __name__)
MAX_PAGE = 100
MAX_QUERY = 200


def json_object() -> dict:
    body = request.get_json(silent=True) if request.is_json else None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    return body


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name, str(default))
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise BadRequest(f"'{name}' must be an integer between {low} and {high}.", param=name)
    return int(raw)


@blueprint.get("/conversations")
def list_conversations():
    limit, offset = _int_arg("limit", 20, 1, MAX_PAGE), _int_arg("offset", 0, 0, 10**9)
    query = request.args.get("q", "").strip()
    if len(query) > MAX_QUERY:
        raise BadRequest(f"'q' may have at most {MAX_QUERY} characters.", param="q")
    items = services().store.list(current_user(), limit=limit, offset=offset, query=query)
    return jsonify({"conversations": items, "limit": limit, "offset": offset, "q": query})


@blueprint.get("/conversations/<conversation_id>")
def get_conversation(conversation_id: str):
    """A conversation's turns as the user saw them, so a reloaded page can restore its history."""
    return jsonify(services().store.get(conversation_id, current_user()).public())


@blueprint.patch("/conversations/<conversation_id>")
def rename_conversation(conversation_id: str):
    title = json_object().get("title")
    if not isinstance(title, str) or not title.strip() or len(title) > 200:
        raise BadRequest("'title' must be a non-empty string of at most 200 characters.", param="title")
    services().store.rename(conversation_id, current_user(), title.strip())
    return jsonify({"id": conversation_id, "title": title.strip()})


@blueprint.delete("/conversations/<conversation_id>")
def delete_conversation(conversation_id: str):
    """Delete it and free its cached state in the engine."""
    llm = services()
    llm.engine.forget(llm.store.delete(conversation_id, current_user()))
    return jsonify({"deleted": conversation_id})


def as_markdown(conversation: Conversation) -> str:
    lines = [f"# {conversation.title or conversation.id}", "", f"Personality: {conversation.personality}", ""]
    for turn in conversation.turns:
        public = turn.public()
        lines += [f"## {'You' if turn.role == 'user' else 'Assistant'}", "", public["content"], ""]
        lines += [f"- [{s.get('title') or s.get('url')}]({s.get('url')})" for s in turn.sources if s.get("url")]
    return "\n".join(lines).rstrip() + "\n"


@blueprint.get("/conversations/<conversation_id>/export")
def export_conversation(conversation_id: str):
    conversation = services().store.get(conversation_id, current_user())
    fmt = request.args.get("format", "md")
    if fmt == "json":
        body = json.dumps(conversation.public(), ensure_ascii=False, indent=2)
        mimetype, ext = "application/json", "json"
    elif fmt in ("md", "markdown"):
        body, mimetype, ext = as_markdown(conversation), "text/markdown", "md"
    else:
        raise BadRequest("'format' must be md or json.", param="format")
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", conversation_id)[:40]
    return Response(body, mimetype=mimetype,
                    headers={"Content-Disposition": f'attachment; filename="conversation-{safe}.{ext}"'})


@blueprint.post("/conversations/<conversation_id>/messages/<int:message_id>/choose")
def choose_variant(conversation_id: str, message_id: int):
    """Show another variant of a message (an earlier question before it was edited, another regeneration of an
    answer): the conversation continues from there. Answers with the conversation as it now reads."""
    if message_id >= 2**63:
        raise NotFound(f"Unknown message {message_id} in conversation '{conversation_id}'.")
    return jsonify(services().store.choose(conversation_id, current_user(), message_id).public())


@blueprint.post("/conversations/<conversation_id>/messages/<int:message_id>/feedback")
def feedback(conversation_id: str, message_id: int):
    """Thumbs up or down, with an optional comment, on one answer."""
    body = json_object()
    raw = body.get("rating")
    rating = {"up": 1, "down": -1, 1: 1, -1: -1}.get(raw) if type(raw) in (str, int) else None
    comment = body.get("comment", "")
    if rating is None:
        raise BadRequest("'rating' must be 'up' or 'down'.", param="rating")
    if not isinstance(comment, str) or len(comment) > 2000:
        raise BadRequest("'comment' must be a string of at most 2000 characters.", param="comment")
    llm = services()
    conversation = llm.store.get(conversation_id, current_user())
    if message_id >= 2**63:
        raise NotFound(f"Unknown answer {message_id} in conversation '{conversation_id}'.")
    previous = next((turn.rating for turn in conversation.turns if turn.message_id == message_id), None)
    llm.store.feedback(conversation_id, message_id, current_user(), rating, comment)
    observer = llm.chat.observer
    if observer is not None and hasattr(observer, "feedback"):
        observer.feedback(conversation.personality, rating > 0, previous)
    return jsonify({"message_id": message_id, "rating": "up" if rating > 0 else "down", "comment": comment})


@blueprint.get("/feedback/export")
def export_feedback():
    """The caller's rated answers with their questions, as JSON lines for analysis."""
    rows = services().store.export_feedback(current_user())
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return Response(body, mimetype="application/x-ndjson",
                    headers={"Content-Disposition": 'attachment; filename="feedback.jsonl"'})
