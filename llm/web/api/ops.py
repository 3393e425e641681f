"""Operations endpoints and hooks: ``/metrics`` (Prometheus), ``/stats`` (charts) and ``/stats.json``.

The request hooks time every HTTP request and report it to the app's observer once the response is ready,
labelled by URL rule (``/gpt/<personality>``, never the raw path, so series stay bounded), personality and
status. Websocket connections are not counted here: each answer on a socket is counted by the observer.
The hooks never raise: an operations bug must not turn a good answer into a 500.
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Response, current_app, g, jsonify, request, send_from_directory

from llm.web.metrics import CONTENT_TYPE

blueprint = Blueprint("ops", __name__)
log = logging.getLogger(__name__)


def observer():
    return current_app.extensions["observability"]


def start_timer() -> None:
    """before_request (installed first, so a request refused by an earlier hook is still timed)."""
    g.ops_started = time.perf_counter()


@blueprint.after_app_request
def count_request(response: Response) -> Response:
    """Report the request to the observer: metrics, a ``request`` log line and the stats ring."""
    try:
        started = g.get("ops_started")
        duration = time.perf_counter() - started if started is not None else 0.0
        rule = request.url_rule
        if rule is not None and getattr(rule, "websocket", False):
            observer().websocket_closed(path=request.path, duration=duration, user=g.get("user"))
            return response
        observer().http_request(method=request.method, path=request.path,
                                endpoint=rule.rule if rule is not None else "unmatched",
                                personality=request_personality(response), status=response.status_code,
                                duration=duration, user=g.get("user"))
    except Exception:
        log.exception("request metrics failed", extra={"event": "observer_error"})
    return response


def request_personality(response: Response) -> str:
    """The personality a request addressed: from the URL, from the answer, or from an OpenAI body's model."""
    name = (request.view_args or {}).get("personality") or g.get("llm_personality")
    if name is None and request.method == "POST" and request.path.startswith("/v1/") and request.is_json \
            and response.status_code < 400:
        data = request.get_json(silent=True)  # a success means the view already read and parsed this body
        name = data.get("model") if isinstance(data, dict) else None
    return observer().label(name)


@blueprint.get("/metrics")
def metrics():
    """Every metric in Prometheus' text format."""
    return Response(observer().metrics.exposition(), content_type=CONTENT_TYPE)


@blueprint.get("/stats")
def stats_page():
    """The charts page; it reads ``/stats.json``."""
    return send_from_directory(current_app.static_folder, "stats.html")


@blueprint.get("/stats.json")
def stats_json():
    """The last hour per minute, latency percentiles, engine load and feedback ratios."""
    response = jsonify(observer().snapshot())
    response.headers["Cache-Control"] = "no-store"
    return response
