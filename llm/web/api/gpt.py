"""``/gpt/<personality>``: one prompt in (GET ``?prompt=``, POST form or JSON), the answer out as text."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, request

from llm.errors import BadRequest
from llm.web.auth import current_user
from llm.web.server import on_disconnect

blueprint = Blueprint("gpt", __name__)


def request_fields() -> dict:
    """Parameters from the query string, a form body or a JSON object body."""
    values = dict(request.args)
    if request.method == "POST":
        if request.is_json:
            body = request.get_json(silent=True)
            if not isinstance(body, dict):
                raise BadRequest("The body must be a JSON object such as {\"prompt\": \"...\"}.")
            values.update(body)
        else:
            values.update(request.form)
    return values


def sources_headers(turn) -> dict[str, str]:
    """Sources and fetch notices as JSON in headers (ASCII-escaped, as headers must be)."""
    headers = {}
    if turn.sources:
        headers["X-Sources"] = json.dumps(turn.sources, ensure_ascii=True)
    if turn.notices:
        headers["X-Notices"] = json.dumps(turn.notices, ensure_ascii=True)
    return headers


@blueprint.route("/gpt/<personality>", methods=["GET", "POST"])
def gpt(personality: str):
    """The whole answer as text/plain; ``session`` continues a conversation."""
    values = request_fields()
    session = values.get("session")
    if session is not None and not isinstance(session, str):
        raise BadRequest("'session' must be a string.", param="session")
    llm = current_app.extensions["llm"]
    turn = llm.chat.start(personality, values.get("prompt"), conversation_id=session, remember=session is not None,
                          channel="gpt", user=current_user())
    on_disconnect(turn.cancel)
    try:
        text = "".join(turn.pieces())
    finally:
        turn.cancel()  # a no-op when done; frees the engine if the client went away
    turn.finish()
    if turn.notices:  # a page that could not be read: said where the reader looks, not only in a header
        text = "".join(f"Note: {notice}\n" for notice in turn.notices) + "\n" + text
    headers = {**sources_headers(turn), "X-Finish-Reason": turn.handle.finish_reason or ""}
    if turn.conversation is not None:
        headers["X-Conversation"] = turn.conversation.id
        headers["X-Message-Id"] = str(turn.assistant_turn.message_id)
    if turn.trimmed:
        headers["X-Trimmed-Turns"] = str(turn.trimmed)
    return Response(text, mimetype="text/plain", headers=headers)
