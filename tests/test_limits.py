"""Limits at the door: body size, prompt tokens, rate per key, CORS."""

from __future__ import annotations


def test_body_size_limit_is_json_413(make_app):
    client = make_app(LLM_MAX_BODY_BYTES=2048).test_client()
    response = client.post("/gpt/greedy", json={"prompt": "x" * 5000})
    assert response.status_code == 413
    assert response.get_json()["error"]["status"] == 413


def test_prompt_token_limit(make_app):
    client = make_app(LLM_MAX_PROMPT_TOKENS=5).test_client()
    assert client.get("/gpt/greedy?prompt=one two three").status_code == 200
    response = client.get("/gpt/greedy", query_string={"prompt": "one two three four five six seven"})
    assert response.status_code == 413
    assert "7 tokens; the limit is 5" in response.get_json()["error"]["message"]


def test_rate_limit_per_key(make_app):
    client = make_app(LLM_API_KEYS="a:key-a,b:key-b", LLM_RATE_LIMIT="2/minute").test_client()
    for _ in range(2):
        assert client.get("/gpt/greedy?prompt=hi", headers={"X-API-Key": "key-a"}).status_code == 200
    limited = client.get("/gpt/greedy?prompt=hi", headers={"X-API-Key": "key-a"})
    assert limited.status_code == 429 and limited.headers["Retry-After"]
    assert limited.get_json()["error"]["type"] == "rate_limited"
    assert client.get("/gpt/greedy?prompt=hi", headers={"X-API-Key": "key-b"}).status_code == 200
    assert client.get("/health").status_code in (200, 503)  # never limited


def test_cors_off_by_default(client):
    response = client.get("/personalities", headers={"Origin": "https://intranet.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_configured(make_app):
    client = make_app(LLM_CORS_ORIGINS="https://intranet.example").test_client()
    allowed = client.options("/v1/chat/completions", headers={
        "Origin": "https://intranet.example", "Access-Control-Request-Method": "POST"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://intranet.example"
    other = client.get("/personalities", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
