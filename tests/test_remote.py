"""The remote engine: this service in front of real OpenAI-compatible upstreams (llama-cpp-python's own server,
started from the same wheel on 127.0.0.1 with the embedded model), through every front door, plus failover."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import jsonschema
import openai
import pytest
import requests
import websocket

from app import create_app
from bench._servers import free_port
from llm.engine.remote import LocalTokenizer, RemoteEngine, Upstream, parse_upstreams
from llm.errors import ConfigError, Overloaded
from llm.models import embedded_model_path
from llm.personalities import load_validator, parse_personality
from tests.conftest import TEST_PERSONALITIES, LiveServer

MODEL = embedded_model_path()


class LlamaCppServer:
    """``python -m llama_cpp.server`` on a free loopback port, serving the embedded model."""

    def __init__(self, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", MODEL, "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "1"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log_path.read_text(errors="replace")[-2000:]
            try:
                if requests.get(f"{self.url}/models", timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        raise AssertionError("llama_cpp.server did not start within 180 s")

    def stop(self):
        self.process.kill()
        self.process.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    server = LlamaCppServer(tmp_path_factory.mktemp("upstream") / "server.log")
    yield server
    server.stop()


def remote_app(tmp_path, urls: str):
    return create_app({"TESTING": True, "LLM_PERSONALITIES_DIR": str(TEST_PERSONALITIES), "LLM_UPSTREAMS": urls,
                       "LLM_CONTEXT_WINDOW": 2048, "DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}"})


def remote_engine(app) -> RemoteEngine:
    """The remote engine that serves the service's default model."""
    llm = app.extensions["llm"]
    return llm.engine.engine_for(llm.specs())


@pytest.fixture
def served(upstream, tmp_path):
    """This service, on 127.0.0.1, answering from the upstream."""
    app = remote_app(tmp_path, upstream.url)
    server = LiveServer(app)
    yield server
    server.close()
    app.extensions["llm"].engine.close()


def test_gpt_and_a_conversation_go_through_the_upstream(served):
    first = requests.get(f"{served.url}/gpt/greedy", params={"prompt": "Say hello.", "session": "r1"}, timeout=120)
    assert first.status_code == 200 and first.text.strip() and first.headers["X-Finish-Reason"] in ("stop", "length")
    second = requests.get(f"{served.url}/gpt/greedy", params={"prompt": "Again?", "session": "r1"}, timeout=120)
    assert second.status_code == 200
    turns = served.app.extensions["llm"].store.get("r1").turns
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]  # history kept here, sent there


def test_the_websocket_streams_and_stop_closes_the_upstream_stream(served):
    ws = websocket.create_connection(f"{served.ws_url}/gpt-socket/greedy?format=json", timeout=120)
    ws.send("Count from one to a hundred, in words.")
    frames = []
    while not any(f["type"] == "token" for f in frames):
        frames.append(json.loads(ws.recv()))
    ws.send("|STOP|")
    while frames[-1]["type"] != "end":
        frames.append(json.loads(ws.recv()))
    ws.close()
    assert frames[-1]["finish_reason"] == "cancelled"
    engine = remote_engine(served.app)
    deadline = time.monotonic() + 30
    while engine.stats()["upstreams"][engine.upstreams[0].name]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.stats()["upstreams"][engine.upstreams[0].name]["in_flight"] == 0


def test_toil_answers_validate_whatever_the_upstream_returns(served):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["city", "year"], "additionalProperties": False}
    response = requests.post(f"{served.url}/toil/structured", json={"prompt": "Paris, 1889.", "schema": schema},
                             timeout=300)
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        jsonschema.validate(response.json(), schema)  # never an invalid 200


def test_the_openai_sdk_through_a_remote_personality(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=120)
    try:
        reply = client.chat.completions.create(model="greedy", max_tokens=16,
                                               messages=[{"role": "user", "content": "Hi"}])
        chunks = list(client.chat.completions.create(model="greedy", max_tokens=16, stream=True,
                                                     messages=[{"role": "user", "content": "Hi"}]))
        plain = client.completions.create(model="greedy", prompt="The capital of France is", max_tokens=8)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="greedy", prompt="The capital of France is", max_tokens=8, stream=True))
        with pytest.raises(openai.UnprocessableEntityError):  # tools need the local grammar
            client.chat.completions.create(model="greedy", messages=[{"role": "user", "content": "Hi"}], tools=[
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    finally:
        client.close()
    assert reply.choices[0].message.content and "".join(c.choices[0].delta.content or "" for c in chunks)
    assert plain.choices[0].text and plain.choices[0].text == streamed  # greedy: the upstream's /completions


def test_failover_to_the_next_upstream_and_a_clean_error_mid_stream(upstream, tmp_path):
    second = LlamaCppServer(tmp_path / "second.log")
    app = remote_app(tmp_path, f"{second.url},{upstream.url}")  # the second one is tried first when both idle
    server = LiveServer(app)
    engine = remote_engine(app)
    try:
        ws = websocket.create_connection(f"{server.ws_url}/gpt-socket/greedy?format=json", timeout=120)
        ws.send("Count from one to a hundred, in words.")
        frames = [json.loads(ws.recv())]
        while frames[-1]["type"] != "token":
            frames.append(json.loads(ws.recv()))
        second.stop()  # dies mid-answer
        while frames[-1]["type"] != "end":
            frames.append(json.loads(ws.recv()))
        error = next((f for f in frames if f["type"] == "error"), None)
        if error is None:  # it had finished before it died
            assert frames[-1]["finish_reason"] in ("stop", "length")
        else:  # a clean error naming the upstream, never an answer spliced from two
            assert error["status"] == 502 and second.url.removesuffix("/v1").removeprefix("http://") in error["message"]
        ws.send("And now?")  # the next answer comes from the upstream still alive
        frames = []
        while not frames or frames[-1]["type"] != "end":
            frames.append(json.loads(ws.recv()))
        ws.close()
        assert not any(f["type"] == "error" for f in frames) and frames[-1]["finish_reason"] in ("stop", "length")
        assert engine.stats()["upstreams"][engine.upstreams[1].name]["answered"] >= 1
    finally:
        server.close()
        engine.close()


def test_unreachable_upstreams_are_skipped_then_a_503_naming_them(upstream, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    engine = RemoteEngine(parse_upstreams(f"{dead},{upstream.url}"), timeout=30)
    app = create_app({"TESTING": True, "LLM_PERSONALITIES_DIR": str(TEST_PERSONALITIES),
                      "DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}"}, engine=engine)
    try:
        with app.test_client() as client:
            ok = client.get("/gpt/greedy", query_string={"prompt": "Hi"})
            assert ok.status_code == 200 and ok.get_data(as_text=True)
        assert engine.stats()["upstreams"][engine.upstreams[0].name]["healthy"] is False
        with app.test_client() as client, client.get("/metrics") as metrics:
            scraped = metrics.get_data(as_text=True)
        assert f'llm_upstream_healthy{{upstream="{engine.upstreams[0].name}"}} 0.0' in scraped
        assert f'llm_upstream_answered_total{{upstream="{engine.upstreams[1].name}"}} 1.0' in scraped
        lonely = RemoteEngine([Upstream(dead)], timeout=5)
        lonely.upstreams[0].healthy = False
        lonely.upstreams[0].last_error = "ConnectionError"
        with pytest.raises(Overloaded, match="ConnectionError"):
            lonely._choose(set())
        lonely.close()
    finally:
        engine.close()


def test_token_counts_come_from_the_upstreams_tokenizer(upstream):
    engine = RemoteEngine(parse_upstreams(upstream.url))
    try:
        counted = engine.count_text_tokens(None, "Hello there, how are you today?")
        assert engine.upstreams[0].tokenizer == "extras" and 4 <= counted <= 12
    finally:
        engine.close()


@pytest.mark.parametrize("spec", ["", "ftp://x/v1", "http://x:8000", " , "])
def test_bad_upstream_lists_stop_start_up(spec):
    with pytest.raises(ConfigError, match="LLM_UPSTREAMS"):
        parse_upstreams(spec)


def test_keys_travel_as_bearer_tokens():
    upstream, = parse_upstreams("http://a:1/v1|s3cret")
    assert upstream.headers() == {"Authorization": "Bearer s3cret"} and upstream.name == "a:1"


def test_one_personality_remote_the_others_local(upstream, tmp_path, monkeypatch):
    """A personality's ``[model] upstreams`` sends it to those servers (its key read from the environment) while
    the service's default model stays in this process."""
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "s3cret")
    directory = tmp_path / "personalities"
    shutil.copytree(TEST_PERSONALITIES, directory)
    text = (TEST_PERSONALITIES / "greedy.toml").read_text().replace('name = "greedy"', 'name = "far"')
    (directory / "far.toml").write_text(f'{text}\n[model]\nupstreams = ["{upstream.url}|$TEST_UPSTREAM_KEY"]\n'
                                        f'tokenizer = "{MODEL}"\n')
    app = create_app({"TESTING": True, "LLM_PERSONALITIES_DIR": str(directory), "LLM_CONTEXT_WINDOW": 2048,
                      "DATABASE_URL": f"sqlite:///{tmp_path / 'c.db'}"})
    llm = app.extensions["llm"]
    try:
        with app.test_client() as client:
            far = client.get("/gpt/far", query_string={"prompt": "Say hello."})
            near = client.get("/gpt/greedy", query_string={"prompt": "Say hello."})
            models = client.get("/v1/models").get_json()["data"]
        assert far.status_code == 200 and near.status_code == 200 and far.get_data(as_text=True)
        remote = llm.engine.engine_for(llm.specs(llm.personalities.get("far")))
        assert remote.tokenizer is not None and remote.upstreams[0].key == "s3cret"
        assert remote.stats()["upstreams"][remote.upstreams[0].name]["answered"] == 1
        stats = llm.engine.stats()  # the local model's figures and the upstream's, side by side
        assert stats["models"] and remote.upstreams[0].name in stats["upstreams"]
        assert {m["id"] for m in models} >= {"far", "greedy"}
    finally:
        llm.engine.close()


@pytest.mark.parametrize(("model", "message"), [
    ('upstreams = ["http://a:1/v1|$NO_SUCH_KEY_VARIABLE"]', r"\$NO_SUCH_KEY_VARIABLE, which is not set"),
    ('upstreams = ["http://a:1/v1"]\nfile = "x.gguf"', "exclude each other"),
    ('upstreams = ["http://a:1/chat"]', "model/upstreams"),
    ('upstreams = ["http://a:1/v1"]\ntokenizer = "missing.gguf"', "model/tokenizer.*does not exist"),
    ('tokenizer = "x.gguf"', "for upstreams only"),
])
def test_bad_personality_upstreams_name_the_file(tmp_path, model, message):
    path = tmp_path / "far.toml"
    text = (TEST_PERSONALITIES / "greedy.toml").read_text().replace('name = "greedy"', 'name = "far"')
    path.write_text(f"{text}\n[model]\n{model}\n")
    with pytest.raises(ConfigError, match=message):
        parse_personality(path, load_validator())


def test_a_local_tokenizer_counts_for_upstreams_without_one(upstream, tmp_path):
    """An upstream without a tokenize endpoint: the GGUF of its model, read here, gives the very counts the
    upstream's own tokenizer gives; a Hugging Face tokenizer.json works the same way."""
    text = "Hello there, how are you today? Fine, thanks."
    asked = RemoteEngine(parse_upstreams(upstream.url))
    local = RemoteEngine(parse_upstreams(upstream.url), tokenizer=LocalTokenizer(MODEL))
    local.upstreams[0].tokenizer = ""  # as if it had no endpoint
    try:
        theirs, mine = asked.count_text_tokens(None, text), local.count_text_tokens(None, text)
        assert asked.upstreams[0].tokenizer == "extras" and mine == theirs
        assert mine != len(text) // 3 + 1  # not the estimate
    finally:
        asked.close()
        local.close()
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "there": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "tokenizer.json"))
    assert LocalTokenizer(str(tmp_path / "tokenizer.json")).count("hello there friend") == 3


@pytest.mark.parametrize("name", ["missing.gguf", "notes.txt"])
def test_bad_local_tokenizers_stop_start_up(tmp_path, name):
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(ConfigError, match="upstream tokenizer"):
        LocalTokenizer(str(tmp_path / name))
