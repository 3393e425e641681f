"""Operations: /metrics, /stats and /stats.json, JSON log lines with and without transcripts."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
import websocket
from prometheus_client.parser import text_string_to_metric_families

from app import create_app
from llm.engine.fake import FakeEngine
from llm.errors import ServiceError
from llm.web.logs import JsonFormatter, configure_logging
from llm.web.metrics import Metrics
from llm.web.observability import WINDOW_MINUTES, Observer, install_observability, percentiles
from tests.conftest import TEST_PERSONALITIES, LiveServer

POOL_STATS = {"loading": [], "load_errors": {}, "models": {"gemma.gguf": {
    "queue_depth": 3, "active_sequences": 5, "cached_conversations": 2, "suspended_conversations": 1,
    "cache_tokens_used": 900, "cache_tokens": 8192, "cache_hit_tokens": 1200, "prompt_tokens": 4000,
    "evictions": 7, "suspends": 4, "restores": 2, "steps": 321, "last_step_age": 0.01,
    "step_fixed_seconds": 0.009, "step_token_seconds": 0.0044},
    "unfitted.gguf": {"steps": 1, "step_fixed_seconds": None, "step_token_seconds": None}}}


class BusyEngine(FakeEngine):
    """A fake engine whose stats look like ModelPool's under load (or fail, to test scrapes)."""

    def __init__(self, stats=POOL_STATS, fail: bool = False):
        super().__init__()
        self._stats, self._fail = stats, fail

    def stats(self):
        if self._fail:
            raise RuntimeError("engine closing")
        return self._stats


def observed(app):
    """The app with observability installed (the same call create_app makes once it is wired in)."""
    if "observability" not in app.extensions:
        install_observability(app)
    return app


@pytest.fixture
def ops_app(make_app):
    return observed(make_app())


@pytest.fixture
def ops_client(ops_app):
    return ops_app.test_client()


@pytest.fixture
def build_with(model_file, tmp_path):
    """An observed app on a given engine."""

    def build(engine, **config):
        base = {"TESTING": True, "LLM_MODEL_FILE": model_file, "LLM_PERSONALITIES_DIR": str(TEST_PERSONALITIES),
                "DATABASE_URL": f"sqlite:///{tmp_path / 'conversations.db'}"}
        return observed(create_app({**base, **config}, engine=engine))

    return build


def scrape(client, **kwargs) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    response = client.get("/metrics", **kwargs)
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def events(caplog, name: str) -> list[dict]:
    """The JSON lines our formatter writes for the captured records of one event."""
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(record)) for record in caplog.records]
    return [line for line in lines if line.get("event") == name]


# ----- /metrics ----------------------------------------------------------------------------------------------

def test_counters_move_with_requests(ops_client):
    before = scrape(ops_client)
    assert ops_client.get("/gpt/greedy?prompt=Hi").status_code == 200
    assert ops_client.get("/gpt/nobody?prompt=Hi").status_code == 404
    assert ops_client.post("/v1/chat/completions", json={"model": "greedy", "messages": [
        {"role": "user", "content": "Hi"}]}).status_code == 200
    after = scrape(ops_client)
    gpt = {"channel": "http", "endpoint": "/gpt/<personality>", "personality": "greedy", "status": "200"}
    assert value(after, "llm_requests_total", **gpt) == value(before, "llm_requests_total", **gpt) + 1
    assert value(after, "llm_requests_total", channel="http", endpoint="/gpt/<personality>",
                 personality="unknown", status="404") == 1
    assert value(after, "llm_requests_total", channel="http", endpoint="/v1/chat/completions",
                 personality="greedy", status="200") == 1
    assert value(after, "llm_answers_total", personality="greedy", channel="gpt", finish_reason="stop") == 1
    assert value(after, "llm_answers_total", personality="greedy", channel="openai", finish_reason="stop") == 1
    assert value(after, "llm_completion_tokens_total", personality="greedy") == 10  # five pieces, twice
    assert value(after, "llm_prompt_tokens_total", personality="greedy") > 0
    assert value(after, "llm_time_to_first_token_seconds_count", personality="greedy") == 2
    assert value(after, "llm_tokens_per_second_count", personality="greedy") == 2
    assert value(after, "llm_request_duration_seconds_count", endpoint="/gpt/<personality>") == 2


def test_unknown_names_share_one_series(ops_client):
    for index in range(20):
        ops_client.get(f"/gpt/attacker-{index}?prompt=Hi")
    ops_client.get("/no/such/page")
    samples = scrape(ops_client)
    personalities = {dict(labels).get("personality") for name, labels in samples if name == "llm_requests_total"}
    assert personalities <= {"unknown", "", "greedy"}
    assert value(samples, "llm_requests_total", channel="http", endpoint="unmatched", personality="",
                 status="404") == 1


def test_streamed_openai_answer_is_labelled_by_model(ops_client):
    response = ops_client.post("/v1/chat/completions", json={"model": "other", "stream": True, "messages": [
        {"role": "user", "content": "Hi"}]})
    assert b"[DONE]" in response.get_data()
    samples = scrape(ops_client)
    assert value(samples, "llm_requests_total", channel="http", endpoint="/v1/chat/completions",
                 personality="other", status="200") == 1
    assert value(samples, "llm_answers_total", personality="other", channel="openai", finish_reason="stop") == 1


def test_refused_requests_are_counted(build_with):
    client = build_with(FakeEngine(), LLM_API_KEYS="alice:secret").test_client()
    assert client.get("/gpt/greedy?prompt=Hi").status_code == 401
    samples = scrape(client, headers={"Authorization": "Bearer secret"})
    assert value(samples, "llm_requests_total", channel="http", endpoint="/gpt/<personality>",
                 personality="greedy", status="401") == 1
    assert value(samples, "llm_request_duration_seconds_count", endpoint="/gpt/<personality>") == 1


def test_engine_figures_are_read_at_scrape_time(build_with):
    client = build_with(BusyEngine()).test_client()
    samples = scrape(client)
    model = {"model": "gemma.gguf"}
    assert value(samples, "llm_engine_queue_depth", **model) == 3
    assert value(samples, "llm_engine_active_sequences", **model) == 5
    assert value(samples, "llm_engine_cache_hit_tokens_total", **model) == 1200
    assert value(samples, "llm_engine_evictions_total", **model) == 7
    assert value(samples, "llm_engine_suspends_total", **model) == 4
    assert value(samples, "llm_engine_restores_total", **model) == 2
    assert value(samples, "llm_engine_cache_tokens_used", **model) == 900
    assert value(samples, "llm_engine_step_fixed_seconds", **model) == 0.009
    assert value(samples, "llm_engine_step_token_seconds", **model) == 0.0044
    assert ("llm_engine_step_fixed_seconds", (("model", "unfitted.gguf"),)) not in samples  # no fit yet: no sample


def test_a_failing_engine_does_not_break_the_scrape(build_with, caplog):
    client = build_with(BusyEngine(fail=True)).test_client()
    samples = scrape(client)
    assert ("llm_models_loading", ()) in samples
    assert "engine.stats() failed" in caplog.text


def test_fetch_outcomes(ops_app):
    metrics = ops_app.extensions["observability"].metrics
    for outcome in ("ok", "ok", "refused", "cached", "Not A Label!"):
        metrics.fetch_outcome(outcome)
    samples = scrape(ops_app.test_client())
    assert value(samples, "llm_fetches_total", outcome="ok") == 2
    assert value(samples, "llm_fetches_total", outcome="refused") == 1
    assert value(samples, "llm_fetches_total", outcome="other") == 1


def test_each_app_has_its_own_registry(make_app):
    first, second = observed(make_app()), observed(make_app())
    first.test_client().get("/gpt/greedy?prompt=Hi")
    assert value(scrape(second.test_client()), "llm_answers_total", personality="greedy", channel="gpt",
                 finish_reason="stop") == 0


def test_socket_answers_are_counted_one_by_one(ops_app):
    server = LiveServer(ops_app)
    try:
        ws = websocket.create_connection(f"{server.ws_url}/gpt-socket/greedy", timeout=10)
        for prompt in ("One", "Two"):
            ws.send(prompt)
            while ws.recv() != "<END>":
                pass
        ws.close()
        samples = scrape(ops_app.test_client())
    finally:
        server.close()
    assert value(samples, "llm_requests_total", channel="socket", endpoint="/gpt-socket/<personality>",
                 personality="greedy", status="200") == 2
    assert not any(dict(labels).get("endpoint") == "/gpt-socket/<personality>" and dict(labels)["channel"] == "http"
                   for name, labels in samples if name == "llm_requests_total")


def test_refused_socket_prompts_are_counted(ops_app, caplog):
    from llm.errors import PayloadTooLarge

    caplog.set_level(logging.INFO, logger="llm.events")
    observer = ops_app.extensions["observability"]
    observer.socket_refused("greedy", PayloadTooLarge("Too long."))
    samples = scrape(ops_app.test_client())
    assert value(samples, "llm_requests_total", channel="socket", endpoint="/gpt-socket/<personality>",
                 personality="greedy", status="413") == 1
    (line,) = [line for line in events(caplog, "request") if line.get("channel") == "socket"]
    assert line["status"] == 413 and line["error_type"] == "prompt_too_large"
    assert observer.snapshot()["totals"]["client_errors"] == 1


def test_a_failed_answer_is_not_counted_twice_on_a_socket(build_with):
    app = build_with(FailingEngine())
    server = LiveServer(app)
    try:
        ws = websocket.create_connection(f"{server.ws_url}/gpt-socket/greedy", timeout=10)
        ws.send("Hi")
        frames = []
        while not frames or frames[-1] != "<END>":
            frames.append(ws.recv())
        ws.close()
        observer = app.extensions["observability"]
        # what the lead's socket.py does with the error frame's error (see the wiring notes):
        observer.socket_refused("greedy", app.extensions["llm"].engine.last_error)
        samples = scrape(app.test_client())
    finally:
        server.close()
    assert frames[-2].startswith("<ERROR>")
    assert value(samples, "llm_requests_total", channel="socket", endpoint="/gpt-socket/<personality>",
                 personality="greedy", status="500") == 1


# ----- /stats and /stats.json --------------------------------------------------------------------------------

def test_stats_page_and_assets(ops_client):
    page = ops_client.get("/stats")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "/static/stats.js" in html and "/static/style.css" in html
    for asset in ("/static/stats.js", "/static/stats.css"):
        response = ops_client.get(asset)
        assert response.status_code == 200
        response.close()
    page.close()


def test_stats_json_after_requests(ops_app, ops_client):
    empty = ops_client.get("/stats.json").get_json()
    assert len(empty["minutes"]) == WINDOW_MINUTES
    assert empty["latency"]["time_to_first_token"] == {"p50": None, "p95": None, "p99": None}
    assert empty["feedback"] == []
    ops_client.get("/gpt/greedy?prompt=Hi")
    ops_client.get("/gpt/greedy?prompt=")
    observer = ops_app.extensions["observability"]
    observer.feedback("greedy", True)
    observer.feedback("greedy", True)
    observer.feedback("greedy", False)
    data = ops_client.get("/stats.json").get_json()
    assert data["totals"]["answers"] == 1
    assert data["totals"]["client_errors"] == 1
    assert data["totals"]["completion_tokens"] == 5
    assert data["minutes"][-1]["answers"] == 1
    assert data["latency"]["samples"] == 1 and data["latency"]["time_to_first_token"]["p50"] == 0.001
    assert data["feedback"] == [{"personality": "greedy", "up": 2, "down": 1, "ratio": 0.6667}]
    assert data["load"] == {"queue_depth": 0, "active_sequences": 0}


def test_load_is_sampled_at_each_turn_and_each_stats_call(build_with):
    app = build_with(BusyEngine())
    data = app.test_client().get("/stats.json").get_json()
    assert data["load"] == {"queue_depth": 3, "active_sequences": 5}
    assert data["minutes"][-1]["queue_depth"] == 3 and data["minutes"][-1]["active_sequences"] == 5


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_ring_is_bounded_and_forgets_old_minutes():
    clock = Clock()
    observer = Observer(Metrics(lambda: {"models": {}}, process=False), None, FakeEngine(), clock=clock)
    for _ in range(3 * WINDOW_MINUTES):
        observer.http_request(method="GET", path="/x", endpoint="/x", personality="", status=200, duration=0.01,
                              user=None)
        clock.now += 60
    assert len(observer._minutes) == WINDOW_MINUTES
    snapshot = observer.snapshot()
    assert snapshot["totals"]["requests"] == WINDOW_MINUTES - 1  # the current minute has had none yet
    clock.now += 2 * 3600
    assert observer.snapshot()["totals"]["requests"] == 0
    clock.now -= 600  # a clock stepping back adds to the newest bucket instead of failing
    observer.http_request(method="GET", path="/x", endpoint="/x", personality="", status=503, duration=0.01,
                          user=None)
    assert observer._minutes[-1].server_errors == 1


def test_percentiles_nearest_rank():
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None}
    assert percentiles([float(n) for n in range(1, 101)]) == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert percentiles([2.0]) == {"p50": 2.0, "p95": 2.0, "p99": 2.0}


def test_feedback_for_unknown_personalities_is_bounded(ops_app):
    observer = ops_app.extensions["observability"]
    for index in range(50):
        observer.feedback(f"made-up-{index}", index % 2 == 0)
    feedback = observer.snapshot()["feedback"]
    assert [item["personality"] for item in feedback] == ["unknown"]
    assert feedback[0]["up"] == 25 and feedback[0]["down"] == 25


# ----- logs --------------------------------------------------------------------------------------------------

def test_log_lines_without_transcripts(ops_client, caplog):
    caplog.set_level(logging.INFO, logger="llm.events")
    assert ops_client.get("/gpt/greedy?prompt=Secret+question+42").status_code == 200
    (request,) = [line for line in events(caplog, "request") if line["endpoint"] == "/gpt/<personality>"]
    assert request["method"] == "GET" and request["path"] == "/gpt/greedy" and request["status"] == 200
    assert request["duration"] >= 0 and request["user"] == "anonymous"
    (generation,) = events(caplog, "generation")
    assert generation["personality"] == "greedy" and generation["channel"] == "gpt"
    assert generation["finish_reason"] == "stop" and generation["completion_tokens"] == 5
    assert generation["ttft"] == 0.001 and generation["tokens_per_second"] > 0
    assert "prompt" not in generation and "answer" not in generation
    formatter = JsonFormatter()
    assert not any("Secret" in formatter.format(record) for record in caplog.records)  # not even the query


def test_log_lines_with_transcripts(make_app, caplog):
    client = observed(make_app(LLM_LOG_TRANSCRIPTS=True)).test_client()
    caplog.set_level(logging.INFO, logger="llm.events")
    client.post("/gpt/greedy", data={"prompt": "Secret question 42"})
    (generation,) = events(caplog, "generation")
    assert generation["prompt"] == "Secret question 42"
    assert generation["answer"] == "Hello from the fake engine."


class FailingEngine(FakeEngine):
    """Streams one piece, then fails the answer the way an unloaded model does."""

    last_error = None

    def _play(self, handle, pieces, request, prompt_tokens):
        handle.push("partial")
        self.last_error = ServiceError("The model was unloaded.")
        handle.fail(self.last_error)


def test_failed_answers_are_logged_as_warnings(build_with, caplog):
    client = build_with(FailingEngine()).test_client()
    caplog.set_level(logging.INFO, logger="llm.events")
    response = client.get("/gpt/greedy?prompt=Hi")
    assert response.status_code == 500 and response.get_json()["error"]["type"] == "internal_error"
    (generation,) = events(caplog, "generation")
    assert generation["level"] == "WARNING" and generation["finish_reason"] == "error"
    assert generation["error"] == "The model was unloaded."
    samples = scrape(client)
    assert value(samples, "llm_answers_total", personality="greedy", channel="gpt", finish_reason="error") == 1


def test_unhandled_errors_log_a_traceback_with_the_incident(ops_app, caplog):
    def boom():
        raise RuntimeError("kaboom")

    ops_app.add_url_rule("/boom-for-test", view_func=boom)
    response = ops_app.test_client().get("/boom-for-test")
    assert response.status_code == 500
    incident = response.get_json()["error"]["message"].split("incident ")[1].rstrip(").")
    formatter = JsonFormatter()
    (line,) = [json.loads(formatter.format(r)) for r in caplog.records if r.levelno == logging.ERROR]
    assert incident in line["message"]
    assert "Traceback" in line["exc_info"] and "RuntimeError: kaboom" in line["exc_info"]
    assert "\n" not in formatter.format([r for r in caplog.records if r.levelno == logging.ERROR][0])


def test_formatter_writes_one_ascii_line_whatever_the_text():
    record = logging.LogRecord("llm.events", logging.INFO, __file__, 1, "odd %s", ("text",), None)
    record.prompt = "line\nbreak \u2028 separator \x00 nul \ud800 surrogate \u202e rtl 😀"
    record.when = object()  # not JSON: written with str()
    line = JsonFormatter().format(record)
    assert line.isascii() and "\n" not in line
    parsed = json.loads(line)
    assert parsed["prompt"] == record.prompt and parsed["message"] == "odd text" and parsed["level"] == "INFO"


def test_configure_logging_installs_one_json_handler():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    try:
        configure_logging(None, stream=io.StringIO())
        handler = configure_logging(None, stream=stream)
        assert [h for h in root.handlers if h not in handlers] == [handler]
        logging.getLogger("llm.events").info("hello", extra={"event": "test", "n": 1})
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["event"] == "test" and line["n"] == 1 and line["message"] == "hello"


def test_observer_never_raises_into_an_answer(ops_app, caplog):
    observer = ops_app.extensions["observability"]

    class Broken:
        personality, channel, user, error, text = "greedy", "gpt", None, None, ""
        handle = None  # no usage: the observer's own bug, which must stay its own

    observer.turn_finished(Broken())
    assert "observer failed" in caplog.text


# ----- the stats page in a browser ---------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"  # Debian's, as in test_browser.py
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


@pytest.mark.browser
def test_stats_page_draws_its_charts(ops_app, ops_client):
    playwright_api = pytest.importorskip("playwright.sync_api")
    for _ in range(3):
        ops_client.get("/gpt/greedy?prompt=Hi")
    ops_client.get("/gpt/nobody?prompt=Hi")
    server, errors = LiveServer(ops_app), []
    try:
        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{server.url}/stats")
            page.wait_for_selector("#requests-chart svg[role=img]")
            requests_desc = page.text_content("#requests-chart svg desc")
            tiles = page.inner_text("#tile-answers")
            feedback = page.inner_text("#feedback-chart")
            tables = page.locator("details.data table").count()
            banner_hidden = page.is_hidden("#banner")
            browser.close()
    finally:
        server.close()
    assert errors == [] and banner_hidden
    assert re.match(r"\d+ in the last hour; busiest minute \d+\.", requests_desc) and tiles == "3"
    assert feedback == "No feedback yet."
    assert tables >= 4  # every chart carries its data as a table


@pytest.mark.browser
def test_stats_page_with_an_api_key(build_with):
    playwright_api = pytest.importorskip("playwright.sync_api")
    app = build_with(FakeEngine(), LLM_API_KEYS="alice:secret")
    server, errors = LiveServer(app), []
    try:
        with playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{server.url}/stats")
            page.wait_for_selector("#banner:not([hidden])")  # no key yet: the page says how to get one
            refused = page.text_content("#banner-text")
            # The key entered once (as the chat page's form does) becomes the cookie the stats page sends too.
            page.request.post(f"{server.url}/auth/session", data={"api_key": "secret"})
            page.reload()
            page.wait_for_selector("#requests-chart svg[role=img]")
            banner_hidden = page.is_hidden("#banner")
            browser.close()
    finally:
        server.close()
    assert errors == [] and banner_hidden
    assert "API key" in refused


def test_a_comment_or_a_change_of_mind_is_not_another_rating(ops_app, ops_client):
    ops_client.get("/gpt/greedy?prompt=Hello&session=rated")
    answer = ops_client.get("/conversations/rated").get_json()["turns"][1]["id"]
    url = f"/conversations/rated/messages/{answer}/feedback"

    def counts():
        return ops_client.get("/stats.json").get_json()["feedback"]

    ops_client.post(url, json={"rating": "up"})
    ops_client.post(url, json={"rating": "up", "comment": "clear and short"})  # the page sends the comment so
    assert [(row["up"], row["down"]) for row in counts()] == [(1, 0)]
    ops_client.post(url, json={"rating": "down"})
    assert [(row["up"], row["down"]) for row in counts()] == [(0, 1)]
