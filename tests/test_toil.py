"""/toil: JSON in, valid JSON out, every refusal a 4xx naming why."""

from __future__ import annotations

import jsonschema
import pytest

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130}},
          "required": ["name", "age"], "additionalProperties": False}


def test_schema_answer_is_returned_as_json(client, fake_engine):
    fake_engine.script(['{"name": "Ada",', ' "age": 36}'])
    response = client.post("/toil/greedy", json={"prompt": "A person", "schema": PERSON})
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.get_json() == {"name": "Ada", "age": 36}
    request = fake_engine.requests[-1]
    assert request.constraint.schema == PERSON
    assert '"required"' in request.messages[-1]["content"]  # the schema is shown to the model too


def test_without_schema_any_object(client, fake_engine):
    fake_engine.script(['{"ok": true}'])
    response = client.post("/toil/greedy", json={"prompt": "Anything"})
    assert response.get_json() == {"ok": True}
    assert fake_engine.requests[-1].constraint.schema is None


def test_text_field_is_context(client, fake_engine):
    fake_engine.script(['{"ok": true}'])
    client.post("/toil/greedy", json={"prompt": "Summarise", "text": "The meeting is on Tuesday."})
    assert "The meeting is on Tuesday." in fake_engine.requests[-1].messages[-1]["content"]


def test_invalid_output_is_never_returned(client, fake_engine):
    fake_engine.script(['{"name": "Ada"}'])
    response = client.post("/toil/greedy", json={"prompt": "A person", "schema": PERSON})
    assert response.status_code >= 400
    assert "error" in response.get_json()


def test_truncated_output_is_an_error(client, fake_engine):
    fake_engine.script(["{"] + ['"a' for _ in range(100)])
    response = client.post("/toil/greedy", json={"prompt": "x", "schema": {"type": "object"}, "max_tokens": 50})
    assert response.status_code == 422
    assert "not complete" in response.get_json()["error"]["message"]
    assert fake_engine.requests[-1].sampling.max_tokens == 50  # the client's limit


def test_an_answer_that_fails_the_exact_schema_is_resampled(client, fake_engine):
    """A superset grammar (here: uniqueItems) lets an invalid answer through; it is generated again."""
    fake_engine.script(["[1,1]"])
    fake_engine.script(["[1,2]"])
    response = client.post("/toil/greedy", json={"prompt": "x", "schema": {"type": "array", "uniqueItems": True}})
    assert response.status_code == 200 and response.get_json() == [1, 2]
    first, second = fake_engine.requests[-2:]
    assert second.sampling.seed is not None and second.sampling.temperature > 0  # greedy personality: resampled
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'llm_schema_answers_total{outcome="valid_after_resampling"} 1.0' in metrics


def test_no_valid_answer_within_the_attempts_is_a_422(make_app, fake_engine):
    client = make_app(LLM_SCHEMA_ATTEMPTS=2).test_client()
    for _ in range(2):
        fake_engine.script(["[1,1]"])
    response = client.post("/toil/greedy", json={"prompt": "x", "schema": {"type": "array", "uniqueItems": True}})
    assert response.status_code == 422 and "2 attempts" in response.get_json()["error"]["message"]


def test_unknown_format_is_served_and_said(client, fake_engine):
    fake_engine.script(['"#ff0000"'])
    response = client.post("/toil/greedy", json={"prompt": "x", "schema": {"type": "string", "format": "color"}})
    assert response.status_code == 200 and response.headers["X-Unchecked-Formats"] == "color"


@pytest.mark.parametrize("body, needle", [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10**9}, "max_tokens"),
                                          ({"timeout": 0}, "timeout"), ({"timeout": "soon"}, "timeout")])
def test_client_limits_are_validated(client, body, needle):
    response = client.post("/toil/greedy", json={"prompt": "x", **body})
    assert response.status_code == 400 and needle in response.get_json()["error"]["message"]


def test_default_token_budget_follows_the_schema(client, fake_engine):
    fake_engine.script(['"a@b.example"'])
    client.post("/toil/greedy", json={"prompt": "x", "schema": {"type": "string", "format": "email"}})
    assert fake_engine.requests[-1].sampling.max_tokens == 144  # an unbounded string: seconds, not minutes


@pytest.mark.parametrize("body, status, needle", [
    ({"prompt": "x", "schema": {"type": "nonsense"}}, 400, "schema"),
    ({"prompt": "x", "schema": {"minLength": "five"}}, 400, "schema"),
    ({"prompt": "x", "schema": 5}, 400, "schema"),
    ({"schema": {"type": "object"}}, 400, "prompt"),
    ({"prompt": "x", "colour": "red"}, 400, "Unknown fields: colour"),
    ({"prompt": "x", "text": 5}, 400, "'text'"),
    ([1, 2], 400, "JSON object"),
])
def test_bad_requests(client, body, status, needle):
    response = client.post("/toil/greedy", json=body)
    assert response.status_code == status
    assert needle.lower() in response.get_json()["error"]["message"].lower()


def test_unknown_personality(client):
    response = client.post("/toil/nobody", json={"prompt": "x"})
    assert response.status_code == 404


@pytest.mark.integration
@pytest.mark.parametrize("schema", [
    PERSON,
    {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 3},
    {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"},
                                                           "kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                                    "maxItems": 2}},
                        "required": ["v"], "additionalProperties": False}},
     "$ref": "#/$defs/node"},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"},
                                      "when": {"type": "string", "format": "date"},
                                      "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["id", "when", "code"], "additionalProperties": False},
])
def test_real_model_output_validates(real_app, schema):
    response = real_app.test_client().post("/toil/structured", json={"prompt": "Give an example.", "schema": schema})
    body = response.get_json()
    if "$ref" in schema and response.status_code == 422:
        # A base model may nest a recursive structure until the token limit: a clear error, never a broken value.
        assert body["error"]["type"] == "incomplete_output"
        return
    assert response.status_code == 200, body
    jsonschema.validate(body, schema, format_checker=jsonschema.FormatChecker())


def test_a_large_schema_is_summarised_in_the_prompt_not_pasted(client, fake_engine):
    """The grammar carries the structure; a schema of thousands of tokens would crowd the question out."""
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string", "description": "x" * 80}
                                               for i in range(40)}}
    fake_engine.script(['{"field_0": "a"}'])
    assert client.post("/toil/greedy", json={"prompt": "Fill it in.", "schema": schema}).status_code == 200
    asked = fake_engine.requests[-1].messages[-1]["content"]
    assert "field_0, field_1" in asked and "description" not in asked and len(asked) < 1500
