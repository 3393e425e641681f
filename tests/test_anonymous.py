"""Without API keys each browser has its own anonymous identity (a signed cookie set by the page)."""

from __future__ import annotations

import uuid

import requests
import websocket

from llm.web.auth import ANON_COOKIE


def browser(server) -> requests.Session:
    """A visitor: loads the page (which gives the identity), then uses the API as the page does."""
    session = requests.Session()
    assert session.get(f"{server.url}/", timeout=30).status_code == 200
    return session


def ask(session: requests.Session, server, prompt: str) -> str:
    reply = session.post(f"{server.url}/gpt/greedy", data={"prompt": prompt, "session": f"c-{uuid.uuid4().hex}"},
                         timeout=30)
    assert reply.status_code == 200
    return reply.headers["X-Conversation"]


def titles(session, server) -> list[str]:
    return [c["title"] for c in session.get(f"{server.url}/conversations", timeout=30).json()["conversations"]]


def test_strangers_never_see_each_others_conversations(live_fake):
    alice, bob, script = browser(live_fake), browser(live_fake), requests.Session()
    try:
        assert alice.cookies[ANON_COOKIE] != bob.cookies[ANON_COOKIE]
        ident = ask(alice, live_fake, "Alice's secret plan")
        ask(bob, live_fake, "Bob's question")
        ask(script, live_fake, "A script's question")  # no cookie: the shared user "anonymous"
        assert titles(alice, live_fake) == ["Alice's secret plan"]
        assert titles(bob, live_fake) == ["Bob's question"]
        assert titles(script, live_fake) == ["A script's question"]
        assert bob.get(f"{live_fake.url}/conversations/{ident}", timeout=30).status_code == 404
        assert alice.get(f"{live_fake.url}/conversations/{ident}", timeout=30).status_code == 200
    finally:
        for session in (alice, bob, script):
            session.close()


def test_the_identity_reaches_the_websocket_and_survives_a_reload(live_fake):
    alice = browser(live_fake)
    try:
        cookie = alice.cookies[ANON_COOKIE]
        alice.get(f"{live_fake.url}/chat/greedy", timeout=30)
        assert alice.cookies[ANON_COOKIE] == cookie  # a valid cookie is kept
        ws = websocket.create_connection(f"{live_fake.ws_url}/gpt-socket/greedy?format=json", timeout=30,
                                         cookie=f"{ANON_COOKIE}={cookie}", origin=live_fake.url)
        try:
            ws.send("Asked over the socket")
            while '"end"' not in ws.recv():
                pass
        finally:
            ws.close()
        assert titles(alice, live_fake) == ["Asked over the socket"]
    finally:
        alice.close()


def test_a_forged_cookie_is_no_identity_and_is_replaced(live_fake):
    forger = requests.Session()
    try:
        forger.cookies.set(ANON_COOKIE, "0" * 32 + ".deadbeef")
        ask(forger, live_fake, "Forged")
        assert titles(requests.Session(), live_fake) == ["Forged"]  # it landed with the shared anonymous user
        fresh = forger.get(f"{live_fake.url}/", timeout=30).headers["Set-Cookie"]
        assert fresh.startswith(f"{ANON_COOKIE}=") and "0" * 32 not in fresh and "HttpOnly" in fresh
    finally:
        forger.close()


def test_with_api_keys_no_anonymous_cookie_is_given(make_app):
    client = make_app(LLM_API_KEYS="alice:secret").test_client()
    with client.get("/") as response:
        assert ANON_COOKIE not in response.headers.get("Set-Cookie", "")
