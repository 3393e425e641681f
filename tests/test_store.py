"""The conversation store on SQLite and on a real PostgreSQL server, and the history API over it."""

from __future__ import annotations

import threading
import uuid

import pytest

from llm.conversation.store import SqlConversationStore
from llm.conversation.turns import Turn
from llm.errors import NotFound, ServiceError
from tests.conftest import LiveServer


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(database_url):
    store = SqlConversationStore(database_url)
    yield store
    store.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_turns_survive_a_new_store_instance(database_url):
    cid = unique("c")
    first = SqlConversationStore(database_url)
    conversation = first.open(cid, "greedy", "alice")
    conversation.first_kept = 0
    first.append(conversation, [Turn("user", "Q (with context)", display="Q"), Turn("assistant", "A")],
                 {"prompt_tokens": 10, "completion_tokens": 3, "time_to_first_token": 0.1, "tokens_per_second": 20.0})
    first.close()
    second = SqlConversationStore(database_url)  # a restart, or another replica
    again = second.open(cid, "greedy", "alice")
    assert [(t.role, t.content) for t in again.turns] == [("user", "Q (with context)"), ("assistant", "A")]
    assert again.public()["turns"][0]["content"] == "Q" and again.title == "Q"
    assert again.turns[1].message_id is not None
    second.close()


def path(conversation) -> list[str]:
    return [turn.content for turn in conversation.turns]


def test_variants_form_a_tree_and_choosing_one_shows_its_branch(store):
    cid = unique("tree")
    conversation = store.open(cid, "greedy", "alice")
    store.append(conversation, [Turn("user", "One"), Turn("assistant", "A1")])
    conversation = store.open(cid, "greedy", "alice")
    store.append(conversation, [Turn("user", "Two"), Turn("assistant", "A2")])
    conversation = store.open(cid, "greedy", "alice")
    one, a1, two, a2 = (turn.message_id for turn in conversation.turns)
    store.append(conversation, [Turn("assistant", "A2 again")], parent=two)  # a regeneration
    assert path(store.get(cid, "alice")) == ["One", "A1", "Two", "A2 again"]
    assert store.get(cid, "alice").turns[3].public()["variants"][0] == a2
    store.append(conversation, [Turn("user", "Uno"), Turn("assistant", "B1")], parent=None)  # an edit of "One"
    edited = store.get(cid, "alice")
    assert path(edited) == ["Uno", "B1"] and edited.turns[0].variants[0] == one
    assert edited.turns[1].public()["variants"] == []  # B1 has no siblings
    back = store.choose(cid, "alice", one)  # the first question again: and below it, what was last shown
    assert path(back) == ["One", "A1", "Two", "A2 again"] and path(store.get(cid, "alice")) == path(back)
    assert path(store.choose(cid, "alice", a2)) == ["One", "A1", "Two", "A2"]
    with pytest.raises(NotFound):
        store.choose(cid, "bob", one)  # someone else's conversation is unknown
    with pytest.raises(NotFound):
        store.choose(cid, "alice", 10**12)


def test_choosing_another_branch_forgets_a_summary_of_turns_no_longer_shown(store):
    cid = unique("trim")
    conversation = store.open(cid, "greedy", "alice")
    store.append(conversation, [Turn("user", "One"), Turn("assistant", "A1")])
    conversation = store.open(cid, "greedy", "alice")
    conversation.first_kept, conversation.summary = 2, "They said one."
    store.append(conversation, [Turn("user", "Two"), Turn("assistant", "A2")])
    one, _, two, a2 = (turn.message_id for turn in store.get(cid, "alice").turns)
    store.append(store.open(cid, "greedy", "alice"), [Turn("assistant", "A2 again")], parent=two)
    chosen = store.choose(cid, "alice", a2)  # the paths agree on the trimmed turns: the summary still holds
    assert (chosen.first_kept, chosen.summary) == (2, "They said one.")
    store.append(store.open(cid, "greedy", "alice"), [Turn("user", "Uno"), Turn("assistant", "B1")], parent=None)
    store.choose(cid, "alice", one)
    chosen = store.choose(cid, "alice", store.get(cid, "alice").turns[0].variants[-1])
    assert (chosen.first_kept, chosen.summary) == (0, "") and path(chosen) == ["Uno", "B1"]


def test_a_failed_transaction_leaves_nothing_behind_and_the_next_ones_work(store):
    """SQLite connections are kept open between transactions: one that failed after a write must be rolled back
    before it is used again."""
    cid = unique("failed")
    with pytest.raises(RuntimeError), store.db.transaction() as cur:
        cur.execute("INSERT INTO conversations (id, client_id, personality, user_id, created, updated) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (uuid.uuid4().hex, cid, "greedy", "alice", 0.0, 0.0))
        raise RuntimeError("the request failed after its first write")
    assert all(item["id"] != cid for item in store.list("alice"))
    for turn in range(12):  # more transactions than connections kept, each seeing the ones before
        conversation = store.open(cid, "greedy", "alice")
        assert len(conversation.turns) == 2 * turn
        store.append(conversation, [Turn("user", f"Q{turn}"), Turn("assistant", f"A{turn}")])


def test_concurrent_turns_from_many_threads_are_all_kept(store):
    """Answer threads write at once, each transaction on a connection no other thread is using."""
    ids = [unique("thread") for _ in range(12)]

    def talk(cid: str) -> None:
        for turn in range(5):
            store.append(store.open(cid, "greedy", "bob"), [Turn("user", f"Q{turn}"), Turn("assistant", "A")])

    threads = [threading.Thread(target=talk, args=(cid,)) for cid in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [len(store.open(cid, "greedy", "bob").turns) for cid in ids] == [10] * len(ids)


def test_conversations_from_before_variants_keep_their_order(tmp_path):
    """A database written before messages had parents (schema version 2) reads as the same linear conversation."""
    import sqlite3

    from llm.conversation.store import MIGRATIONS

    database = tmp_path / "old.db"
    with sqlite3.connect(database) as db:
        for statements in MIGRATIONS[:2]:
            for statement in statements:
                db.execute(statement.format(serial="INTEGER"))
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (2)")
        db.execute("INSERT INTO conversations (id, client_id, personality, user_id, created, updated) "
                   "VALUES ('k', 'old', 'greedy', 'alice', 1, 1)")
        for position, (role, content) in enumerate([("user", "Q1"), ("assistant", "A1"), ("user", "Q2"),
                                                    ("assistant", "A2")]):
            db.execute("INSERT INTO messages (conversation_id, position, role, content, created) "
                       "VALUES ('k', ?, ?, ?, 1)", (position, role, content))
    db.close()
    store = SqlConversationStore(f"sqlite:///{database}")
    conversation = store.get("old", "alice")
    assert path(conversation) == ["Q1", "A1", "Q2", "A2"]
    store.append(conversation, [Turn("user", "Q3"), Turn("assistant", "A3")])
    assert path(store.get("old", "alice"))[-2:] == ["Q3", "A3"]
    store.close()


def test_users_only_see_their_own(store):
    cid = unique("private")
    store.append(store.open(cid, "greedy", "alice"), [Turn("user", "hi"), Turn("assistant", "hello")])
    with pytest.raises(NotFound):
        store.get(cid, "bob")
    # Ids are scoped per user: bob's conversation of the same id is his own, empty one, never "taken".
    bobs = store.open(cid, "greedy", "bob")
    assert bobs.turns == [] and not bobs.stored and bobs.key != store.open(cid, "greedy", "alice").key
    assert cid in [c["id"] for c in store.list("alice")]
    assert cid not in [c["id"] for c in store.list("bob")]
    with pytest.raises(NotFound):
        store.delete(cid, "bob")


def test_search_finds_titles_and_messages_of_ones_own_conversations(store):
    user, other = unique("searcher"), unique("stranger")
    lisbon, wal = unique("lisbon"), unique("wal")
    store.append(store.open(lisbon, "greedy", user), [Turn("user", "(Today is...)\nPlan a weekend", display="Plan a "
                                                           "weekend in LISBON"), Turn("assistant", "Go to Belém.")])
    store.append(store.open(wal, "greedy", user), [Turn("user", "Explain WAL"), Turn("assistant", "100% durable_ish")])
    store.append(store.open(unique("x"), "greedy", other), [Turn("user", "Lisbon too"), Turn("assistant", "ok")])

    def found(query: str) -> list[str]:
        return [c["id"] for c in store.list(user, query=query)]

    assert found("lisbon") == [lisbon]  # what the user typed, in any case
    assert found("belém") == [lisbon] and found("Today is") == []  # answers count; the hidden date line does not
    assert found("100%") == [wal] and found("%") == [wal] and found("_") == [wal]  # wildcards are literal
    assert found("e") == [wal, lisbon] and found("nothing like it") == []


def test_trimmed_flag_rename_delete_feedback(store):
    cid = unique("t")
    conversation = store.open(cid, "greedy", "u")
    store.append(conversation, [Turn("user", "one"), Turn("assistant", "1")])
    conversation.first_kept = 2
    answer = Turn("assistant", "2")
    store.append(conversation, [Turn("user", "two"), answer])
    assert store.get(cid, "u").first_kept == 2
    store.rename(cid, "u", "Numbers")
    assert store.get(cid, "u").title == "Numbers"
    store.feedback(cid, answer.message_id, "u", -1, "wrong number")
    exported = [row for row in store.export_feedback("u") if row["conversation"] == cid]
    assert exported == [{"conversation": cid, "personality": "greedy", "user": "u", "message_id": answer.message_id,
                         "question": "two", "answer": "2", "rating": -1, "comment": "wrong number",
                         "at": exported[0]["at"]}]
    with pytest.raises(NotFound):
        store.feedback(cid, answer.message_id - 1, "u", 1)  # a user message cannot be rated
    store.delete(cid, "u")
    with pytest.raises(NotFound):
        store.get(cid, "u")


def test_retention_purges_old_conversations(store):
    kept = []
    for cid in (unique("old"), unique("new")):
        conversation = store.open(cid, "greedy", "u")
        store.append(conversation, [Turn("user", "q"), Turn("assistant", "a")])
        kept.append(conversation.key)
    import time

    purged = store.purge(1, now=time.time() + 2 * 86400)  # internal keys: what the engine cache is keyed by
    assert set(kept) <= set(purged)
    assert store.purge(1) == []


def test_conversation_rows_exist_only_once_a_turn_is_kept(store):
    cid = unique("empty")
    store.open(cid, "greedy", "u")
    store.open(None, "greedy", "u")
    assert cid not in [c["id"] for c in store.list("u")]
    with pytest.raises(NotFound):
        store.get(cid, "u")


def test_quota_refuses_new_conversations_beyond_it(database_url):
    capped, user = SqlConversationStore(database_url, max_conversations_per_user=2), unique("quota")
    for _ in range(2):
        capped.append(capped.open(None, "greedy", user), [Turn("user", "q"), Turn("assistant", "a")])
    with pytest.raises(ServiceError) as info:
        capped.open(None, "greedy", user)
    assert info.value.status == 403 and "LLM_MAX_CONVERSATIONS_PER_USER" in info.value.message
    capped.close()


def test_history_api_and_restart(make_app, fake_engine):
    app = make_app()
    client = app.test_client()
    client.get("/gpt/greedy?prompt=Hello&session=hist-1")
    listing = client.get("/conversations").get_json()
    assert listing["conversations"][0]["id"] == "hist-1"
    assert listing["conversations"][0]["title"] == "Hello"
    restarted = make_app().test_client()  # same database file: a restart
    turns = restarted.get("/conversations/hist-1").get_json()["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant"]
    message_id = turns[1]["id"]
    feedback = restarted.post(f"/conversations/hist-1/messages/{message_id}/feedback",
                              json={"rating": "up", "comment": "nice"})
    assert feedback.status_code == 200
    assert restarted.get("/conversations/hist-1").get_json()["turns"][1]["rating"] == 1
    assert '"rating": 1' in restarted.get("/feedback/export").get_data(as_text=True)
    markdown = restarted.get("/conversations/hist-1/export?format=md").get_data(as_text=True)
    assert markdown.startswith("# Hello") and "## Assistant" in markdown
    assert restarted.patch("/conversations/hist-1", json={"title": "Greeting"}).status_code == 200
    key = app.extensions["llm"].store.get("hist-1").key
    assert restarted.delete("/conversations/hist-1").status_code == 200
    assert key in fake_engine.forgotten  # the engine's cache is keyed by the internal id
    assert restarted.get("/conversations/hist-1").status_code == 404


@pytest.mark.parametrize("method, url, kwargs, status", [
    ("get", "/conversations?q=" + "x" * 201, {}, 400),
    ("get", "/conversations?limit=0", {}, 400),
    ("get", "/conversations?offset=-1", {}, 400),
    ("patch", "/conversations/nope", {"json": {"title": "x"}}, 404),
    ("patch", "/conversations/nope", {"json": {"title": ""}}, 400),
    ("delete", "/conversations/nope", {}, 404),
    ("get", "/conversations/nope/export?format=pdf", {}, 404),
    ("post", "/conversations/nope/messages/1/feedback", {"json": {"rating": "meh"}}, 400),
    ("post", "/conversations/nope/messages/1/feedback", {"json": {"rating": "up"}}, 404),
])
def test_history_errors(client, method, url, kwargs, status):
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status
    assert response.get_json()["error"]["status"] == status


def test_api_keys_separate_users_and_guard_every_endpoint(make_app):
    app = make_app(LLM_API_KEYS="alice:key-a,bob:key-b")
    client = app.test_client()
    for url in ("/personalities", "/gpt/greedy?prompt=x", "/conversations", "/v1/models"):
        response = client.get(url)
        assert response.status_code == 401, url
        assert "API key" in response.get_json()["error"]["message"]
    assert client.get("/health").status_code in (200, 503)  # open for load balancers
    page = client.get("/")
    assert page.status_code == 200  # the page asks for the key itself
    page.close()
    alice = {"X-API-Key": "key-a"}
    client.get("/gpt/greedy?prompt=Secret&session=alice-1", headers=alice)
    assert client.get("/conversations/alice-1", headers=alice).status_code == 200
    assert client.get("/conversations/alice-1", headers={"Authorization": "Bearer key-b"}).status_code == 404
    assert client.get("/conversations", headers={"X-API-Key": "key-b"}).get_json()["conversations"] == []
    # Keys never travel in URLs (they end up in logs and browser history).
    assert client.get("/conversations?api_key=key-b").status_code == 401


def test_websocket_needs_key_when_configured(make_app):
    import websocket

    server = LiveServer(make_app(LLM_API_KEYS="alice:key-a"))
    try:
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            websocket.create_connection(f"{server.ws_url}/gpt-socket/greedy", timeout=5)
        assert info.value.status_code == 401
        with pytest.raises(websocket.WebSocketBadStatusException):
            websocket.create_connection(f"{server.ws_url}/gpt-socket/greedy?api_key=key-a", timeout=5)
        ws = websocket.create_connection(f"{server.ws_url}/gpt-socket/greedy", header=["X-API-Key: key-a"],
                                         timeout=5)
        ws.send("Hi")
        frames = []
        while not frames or frames[-1] != "<END>":
            frames.append(ws.recv())
        ws.close()
        assert "".join(frames[:-1]) == "Hello from the fake engine."
    finally:
        server.close()


def test_trusted_proxy_header(make_app):
    trusting = make_app(LLM_TRUSTED_PROXIES="127.0.0.1").test_client()
    trusting.get("/gpt/greedy?prompt=x&session=proxy-1", headers={"X-Forwarded-User": "carol"})
    assert trusting.get("/conversations/proxy-1", headers={"X-Forwarded-User": "carol"}).status_code == 200
    assert trusting.get("/conversations/proxy-1").status_code == 404


def test_untrusted_proxy_header_is_ignored(make_app):
    client = make_app().test_client()
    client.get("/gpt/greedy?prompt=x&session=proxy-2", headers={"X-Forwarded-User": "mallory"})
    assert client.get("/conversations/proxy-2").status_code == 200  # still the anonymous user's


def test_two_instances_share_a_postgres_conversation(postgres_url, model_file, tmp_path):
    from app import create_app
    from llm.engine.fake import FakeEngine
    from tests.conftest import TEST_PERSONALITIES

    config = {"TESTING": True, "LLM_MODEL_FILE": model_file, "LLM_PERSONALITIES_DIR": str(TEST_PERSONALITIES),
              "DATABASE_URL": postgres_url}
    first_engine, second_engine = FakeEngine(), FakeEngine()
    first = create_app(config, engine=first_engine).test_client()
    second = create_app(config, engine=second_engine).test_client()
    cid = unique("shared")
    first_engine.script(["Paris."])
    first.get(f"/gpt/greedy?prompt=Capital of France?&session={cid}")
    second.get(f"/gpt/greedy?prompt=And of Italy?&session={cid}")
    contents = [m["content"] for m in second_engine.requests[-1].messages[1:]]
    assert contents == ["Capital of France?", "Paris.", "And of Italy?"]
    assert len(first.get(f"/conversations/{cid}").get_json()["turns"]) == 4
