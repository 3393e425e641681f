"""Two replicas of the service (``python app.py``, the embedded model each) sharing one PostgreSQL behind nginx, as
docs/SCALING.md sets them up: one conversation goes on across both, and survives one replica's death."""

from __future__ import annotations

import json
import signal
import uuid

import pytest
import requests
import websocket

from bench._cluster import Nginx
from bench._servers import our_server
from llm.models import embedded_model_path
from tests.conftest import TEST_PERSONALITIES

pytestmark = pytest.mark.integration

MODEL = embedded_model_path()
KEYS = "alice:key-alice,bob:key-bob"


@pytest.fixture
def cluster(postgres_url, tmp_path):
    replicas = [our_server(MODEL, 1, TEST_PERSONALITIES, name=f"replica-{n}", DATABASE_URL=postgres_url,
                           LLM_API_KEYS=KEYS, LLM_CONTEXT_WINDOW="2048", LLM_DATA_DIR=str(tmp_path / f"data-{n}"))
                for n in (1, 2)]
    started = []
    try:
        for replica in replicas:
            started.append(replica.__enter__())
        with Nginx(replicas) as proxy:
            yield proxy, replicas
    finally:
        for replica in started:
            replica.stop()


def turn(proxy, conversation: str, prompt: str) -> tuple[str, dict]:
    """One question on a new websocket through nginx: which replica answered, and the end frame."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{proxy.port}/gpt-socket/greedy?format=json", timeout=120,
                                     header=["X-API-Key: key-alice"])
    try:
        replica = ws.getheaders().get("x-replica", "")
        ws.send(f"|SESSION|{conversation}|/SESSION|{prompt}")
        while True:
            frame = json.loads(ws.recv())
            assert frame["type"] != "error", frame
            if frame["type"] == "end":
                return replica, frame
    finally:
        ws.close()


def messages(proxy, conversation: str, key: str) -> requests.Response:
    return requests.get(f"{proxy.base}/conversations/{conversation}", headers={"X-API-Key": key}, timeout=60)


def test_a_conversation_goes_on_across_replicas_and_survives_one_dying(cluster):
    proxy, replicas = cluster
    ports = {f"127.0.0.1:{replica.port}": replica for replica in replicas}
    conversation = uuid.uuid4().hex

    first_replica, first = turn(proxy, conversation, "My name is Ada. Say hello.")
    second_replica, second = turn(proxy, conversation, "What is my name?")
    assert {first_replica, second_replica} == set(ports)  # round robin: one turn on each replica
    # The second replica read the first turn from PostgreSQL: its prompt holds the whole history.
    history = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert second["usage"]["prompt_tokens"] > history

    # A document uploaded through one replica is found through the other: knowledge bases live in PostgreSQL too.
    alice = {"X-API-Key": "key-alice"}
    base = requests.post(f"{proxy.base}/knowledge/bases", json={"name": f"kb-{conversation}"}, headers=alice,
                         timeout=60).json()["id"]
    with requests.post(f"{proxy.base}/knowledge/bases/{base}/documents", headers=alice, timeout=120,
                       files={"file": ("ada.md", b"# Ada\n\nAda Lovelace wrote the first published program.")}) as up:
        assert up.status_code == 201, up.text
        uploaded_on = up.headers["X-Replica"]
    for _ in replicas:
        with requests.get(f"{proxy.base}/knowledge/search", params={"q": "first published program"}, headers=alice,
                          timeout=60) as found:
            assert found.json()["passages"][0]["document"] == "ada.md", (uploaded_on, found.headers["X-Replica"])

    ports[second_replica].process.send_signal(signal.SIGKILL)  # one replica dies, nginx is not told
    ports[second_replica].process.wait(30)
    for question in ("And what did I ask first?", "Thank you."):
        tried, frame = turn(proxy, conversation, question)
        assert tried.split(", ")[-1] == first_replica and frame["finish_reason"] in ("stop", "length")
    assert frame["usage"]["prompt_tokens"] > second["usage"]["prompt_tokens"]

    with messages(proxy, conversation, "key-alice") as shown:
        assert shown.status_code == 200
        turns = [m for m in shown.json()["turns"] if m["role"] in ("user", "assistant")]
    assert [m["role"] for m in turns] == ["user", "assistant"] * 4
    assert turns[0]["content"] == "My name is Ada. Say hello."
    with messages(proxy, conversation, "key-bob") as hidden:  # another user's key: not theirs to see
        assert hidden.status_code == 404
