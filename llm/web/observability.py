"""What the service tells its operators: metrics, JSON log events and the figures behind ``/stats``.

``install_observability(app)`` gives an app an ``Observer``: Flask hooks (``llm.web.api.ops``) report each HTTP
request to it, the chat service reports each answer (``turn_finished``), the RAG preprocessor each fetch
(``metrics.fetch_outcome``) and the feedback route each rating (``feedback``). The observer updates the
Prometheus metrics, writes a JSON log line and adds the event to a one-hour ring of per-minute buckets that
``/stats.json`` turns into charts. Everything is bounded: 60 buckets, at most ``LATENCY_SAMPLES`` latency
samples, at most ``MAX_FEEDBACK_KEYS`` personalities with feedback.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from flask import Flask, g, has_request_context

from llm.web.metrics import Metrics

log = logging.getLogger("llm.events")

WINDOW_MINUTES = 60
LATENCY_SAMPLES = 5000
MAX_FEEDBACK_KEYS = 200
SOCKET_ENDPOINT = "/gpt-socket/<personality>"


@dataclass
class Minute:
    """What happened during one minute (``start`` is a Unix time, a multiple of 60)."""

    start: int
    requests: int = 0
    client_errors: int = 0
    server_errors: int = 0
    answers: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_depth: int = 0  # the most seen in the samples of this minute
    active_sequences: int = 0


def percentiles(values: list[float], points: tuple[int, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles (``{"p50": ..., ...}``); None for every point when there are no values."""
    ordered = sorted(values)
    result: dict[str, float | None] = {}
    for point in points:
        if not ordered:
            result[f"p{point}"] = None
            continue
        rank = max(1, math.ceil(point / 100 * len(ordered)))
        result[f"p{point}"] = round(ordered[rank - 1], 4)
    return result


def engine_load(stats: dict[str, Any]) -> tuple[int, int]:
    """Queue depth and active sequences summed over the loaded models."""
    models = (stats or {}).get("models") or {}
    queued = sum(int(figures.get("queue_depth") or 0) for figures in models.values())
    active = sum(int(figures.get("active_sequences") or 0) for figures in models.values())
    return queued, active


class Observer:
    """Hears about requests, answers and feedback; keeps metrics, log lines and an hour of per-minute figures."""

    def __init__(self, metrics: Metrics, settings: Any, engine: Any, personalities: Any = None,
                 clock: Callable[[], float] = time.time):
        self.metrics = metrics
        self.settings = settings
        self.engine = engine
        self.personalities = personalities
        self.clock = clock
        self._lock = threading.Lock()
        self._minutes: deque[Minute] = deque(maxlen=WINDOW_MINUTES)
        self._latency: deque[tuple[float, float | None, float | None]] = deque(maxlen=LATENCY_SAMPLES)
        self._feedback: dict[str, list[int]] = {}

    # ----- events ----------------------------------------------------------------------------------------

    def http_request(self, *, method: str, path: str, endpoint: str, personality: str, status: int,
                     duration: float, user: str | None) -> None:
        """One HTTP request answered (called by the after_request hook)."""
        self.metrics.requests.labels("http", endpoint, personality, str(status)).inc()
        self.metrics.request_seconds.labels(endpoint).observe(duration)
        with self._lock:
            self._count_request(self._minute(), status)
        log.info("%s %s %s", method, path, status, extra={
            "event": "request", "method": method, "path": path, "endpoint": endpoint, "status": status,
            "duration": round(duration, 4), "user": user, "personality": personality or None})

    def socket_refused(self, personality: str, error: Any) -> None:
        """A websocket prompt answered with an error frame; errors of answers already counted are skipped."""
        if getattr(error, "_llm_observed", False):
            return
        status, name = getattr(error, "status", 500), self.label(personality)
        self.metrics.requests.labels("socket", SOCKET_ENDPOINT, name, str(status)).inc()
        with self._lock:
            self._count_request(self._minute(), status)
        log.info("socket prompt refused: %s", getattr(error, "message", error), extra={
            "event": "request", "channel": "socket", "endpoint": SOCKET_ENDPOINT, "personality": name or None,
            "status": status, "error_type": getattr(error, "type", type(error).__name__)})

    def websocket_closed(self, *, path: str, duration: float, user: str | None) -> None:
        """A websocket ended (its answers were counted one by one); logged only."""
        log.info("websocket closed %s", path, extra={"event": "websocket", "path": path,
                                                    "duration": round(duration, 4), "user": user})

    def turn_finished(self, turn: Any) -> None:
        """One answer ended, however it ended (``llm.conversation.service.ActiveTurn``); never raises into the
        answer's path."""
        try:
            self._turn_finished(turn)
        except Exception:
            log.exception("observer failed on a finished turn", extra={"event": "observer_error"})

    def _turn_finished(self, turn: Any) -> None:
        handle, usage = turn.handle, turn.handle.usage
        error = turn.error or handle.error
        reason = handle.finish_reason or ("error" if error is not None else "cancelled")
        status = getattr(error, "status", 500) if error is not None else 200
        personality = turn.personality or "-"
        if error is not None:
            try:
                error._llm_observed = True  # the socket's error frame for it is not a second request
            except AttributeError:
                pass
        self._record_answer_metrics(turn, personality, reason, status)
        queued, active = self._sample_engine()
        with self._lock:
            minute = self._minute()
            minute.answers += 1
            minute.prompt_tokens += usage.prompt_tokens
            minute.completion_tokens += usage.completion_tokens
            if turn.channel == "socket":
                self._count_request(minute, status)
            self._note_load(minute, queued, active)
            tps = usage.tokens_per_second if usage.completion_tokens > 1 else None  # one token has no rate
            if usage.time_to_first_token is not None or tps is not None:
                self._latency.append((self.clock(), usage.time_to_first_token, tps))
        if has_request_context():
            g.llm_personality = turn.personality  # lets the request hook label /v1 requests by personality
        self._log_answer(turn, reason, error)

    def _record_answer_metrics(self, turn: Any, personality: str, reason: str, status: int) -> None:
        metrics, usage = self.metrics, turn.handle.usage
        metrics.answers.labels(personality, turn.channel or "-", reason).inc()
        metrics.prompt_tokens.labels(personality).inc(usage.prompt_tokens)
        metrics.cached_tokens.labels(personality).inc(usage.cached_tokens)
        metrics.completion_tokens.labels(personality).inc(usage.completion_tokens)
        if usage.time_to_first_token is not None:
            metrics.ttft.labels(personality).observe(usage.time_to_first_token)
        if usage.tokens_per_second is not None and usage.completion_tokens > 1:
            metrics.tps.labels(personality).observe(usage.tokens_per_second)
        if turn.channel == "socket":
            metrics.requests.labels("socket", SOCKET_ENDPOINT, personality, str(status)).inc()

    def _log_answer(self, turn: Any, reason: str, error: BaseException | None) -> None:
        usage = turn.handle.usage
        fields = {"event": "generation", "personality": turn.personality, "channel": turn.channel,
                  "user": turn.user, "finish_reason": reason, "prompt_tokens": usage.prompt_tokens,
                  "completion_tokens": usage.completion_tokens, "cached_tokens": usage.cached_tokens,
                  "ttft": usage.time_to_first_token, "tokens_per_second": usage.tokens_per_second}
        if error is not None:
            fields.update(error=getattr(error, "message", str(error)), error_type=getattr(error, "type",
                                                                                          type(error).__name__))
        if getattr(self.settings, "log_transcripts", False):
            user_turn = turn.user_turn
            fields.update(prompt=user_turn.display if user_turn.display is not None else user_turn.content,
                          answer=turn.text)
        log.log(logging.WARNING if error is not None else logging.INFO, "generation finished", extra=fields)

    def feedback(self, personality: str, up: bool, previous: int | None = None) -> None:
        """A thumbs up (``up``) or down on one of this personality's answers; ``previous`` is the answer's earlier
        rating (+1/-1), so a comment on a rated answer, or a change of mind, is not counted as another rating."""
        if previous is not None and (previous > 0) == up:
            return
        name = self.label(personality) or "-"
        self.metrics.feedback.labels(name, "up" if up else "down").inc()
        with self._lock:
            if name not in self._feedback and len(self._feedback) >= MAX_FEEDBACK_KEYS:
                return
            counts = self._feedback.setdefault(name, [0, 0])
            if previous is not None:
                counts[0 if previous > 0 else 1] = max(0, counts[0 if previous > 0 else 1] - 1)
            counts[0 if up else 1] += 1

    # ----- helpers ---------------------------------------------------------------------------------------

    def label(self, name: Any) -> str:
        """A personality name fit for a metric label: known names as they are, anything else 'unknown'.

        Labels from client input (a URL, a JSON body) would otherwise let anyone create unbounded series."""
        if not isinstance(name, str) or not name:
            return ""
        if self.personalities is None:
            return name
        try:
            known = {personality.name for personality in self.personalities.all()}
        except Exception:
            return "unknown"
        return name if name in known else "unknown"

    def _minute(self) -> Minute:
        """The bucket of the current minute (callers hold the lock); a clock going back adds to the last one."""
        start = int(self.clock() // 60) * 60
        if not self._minutes or start > self._minutes[-1].start:
            self._minutes.append(Minute(start))
        return self._minutes[-1]

    @staticmethod
    def _count_request(minute: Minute, status: int) -> None:
        minute.requests += 1
        if 400 <= status < 500:
            minute.client_errors += 1
        elif status >= 500:
            minute.server_errors += 1

    @staticmethod
    def _note_load(minute: Minute, queued: int, active: int) -> None:
        minute.queue_depth = max(minute.queue_depth, queued)
        minute.active_sequences = max(minute.active_sequences, active)

    def _sample_engine(self) -> tuple[int, int]:
        try:
            return engine_load(self.engine.stats())
        except Exception:
            log.exception("engine.stats() failed", extra={"event": "observer_error"})
            return 0, 0

    # ----- the stats page --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The last hour for ``/stats.json``: per-minute series, latency percentiles, load, feedback."""
        queued, active = self._sample_engine()
        with self._lock:
            now = self.clock()
            current = self._minute()
            self._note_load(current, queued, active)
            minutes = self._series(current.start)
            recent = [sample for sample in self._latency if sample[0] >= now - WINDOW_MINUTES * 60]
            feedback = {name: list(counts) for name, counts in self._feedback.items()}
        ttft = [sample[1] for sample in recent if sample[1] is not None]
        tps = [sample[2] for sample in recent if sample[2] is not None]
        totals = {key: sum(minute[key] for minute in minutes)
                  for key in ("requests", "client_errors", "server_errors", "answers", "prompt_tokens",
                              "completion_tokens")}
        return {"generated": now, "window_minutes": WINDOW_MINUTES, "minutes": minutes, "totals": totals,
                "latency": {"samples": len(recent), "time_to_first_token": percentiles(ttft),
                            "tokens_per_second": percentiles(tps)},
                "load": {"queue_depth": queued, "active_sequences": active},
                "feedback": [{"personality": name, "up": up, "down": down, "ratio": round(up / (up + down), 4)}
                             for name, (up, down) in sorted(feedback.items()) if up + down]}

    def _series(self, last_start: int) -> list[dict[str, int]]:
        """One entry per minute of the window, oldest first, zeros where nothing happened."""
        by_start = {minute.start: minute for minute in self._minutes}
        first = last_start - (WINDOW_MINUTES - 1) * 60
        return [asdict(by_start.get(start) or Minute(start)) for start in range(first, last_start + 1, 60)]


def install_observability(app: Flask) -> Observer:
    """Metrics, request hooks, ``/metrics``, ``/stats`` and ``/stats.json`` for an app built by ``create_app``."""
    from llm.web.api import ops

    services = app.extensions["llm"]
    metrics = Metrics(services.engine.stats)
    observer = Observer(metrics, services.settings, services.engine, services.personalities)
    services.chat.observer = observer
    app.extensions["observability"] = observer
    app.register_blueprint(ops.blueprint)
    # First of the before_request hooks, so requests that an earlier hook refuses (a 401) are timed too.
    app.before_request_funcs.setdefault(None, []).insert(0, ops.start_timer)
    return observer
