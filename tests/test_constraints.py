"""Schema compilation, its 400/422 errors, limits, caching, token masks and answer validation.

These run on a byte-level tokenizer (one token per byte), so they need no model file; the real vocabulary and
the JSON-Schema-Test-Suite are exercised in ``test_constraints_model.py``.
"""

from __future__ import annotations

import time

import hypothesis.strategies as st
import llguidance
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from llm.engine.constraints import ConstraintCompiler, apply_bitmask, check_schema, validate_output
from llm.errors import BadRequest, GenerationFailed, Unprocessable

EOS = 256


class ByteTokenizer:
    """Token i is byte i, plus one EOS: every text has exactly one tokenization."""

    eos_token_id = EOS
    bos_token_id = None
    special_token_ids = [EOS]
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


def byte_compiler(**options) -> ConstraintCompiler:
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(ByteTokenizer()))
    return ConstraintCompiler(tokenizer, EOS + 1, **options)


@pytest.fixture(scope="module")
def compiler() -> ConstraintCompiler:
    return byte_compiler()


def matches(compiler: ConstraintCompiler, schema, text: str) -> bool:
    """Feed a text through a fresh state with the mask applied at every step, as the scheduler does."""
    state = compiler.compile_json(schema).new_state()
    for token in list(text.encode()) + [EOS]:
        logits = np.zeros(EOS + 1, dtype=np.float32)
        state.mask_logits(logits)
        if not np.isfinite(logits[token]):
            return False
        if token == EOS:
            return True
        state.accept(token)
    return False


KIDS = {"type": "array", "items": {"$ref": "#/$defs/node"}}
TREE = {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": KIDS},
                           "required": ["v", "kids"], "additionalProperties": False}},
        "$ref": "#/$defs/node"}
PET = {"oneOf": [{"$ref": "#/$defs/cat"}, {"$ref": "#/$defs/dog"}],
       "$defs": {"cat": {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"]},
                 "dog": {"type": "object", "properties": {"kind": {"const": "dog"}, "bark": {"type": "boolean"}},
                         "required": ["kind"]}}}

ENFORCED = [  # (schema, a matching compact text, a text the grammar must refuse)
    (None, '{"a":[1,"x",null]}', "[1]"),
    (True, "[1]", "[1, 2]"),
    ({"type": "object", "properties": {"n": {"type": "string"}}, "required": ["n"]}, '{"n":"x"}', "{}"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
     '{"a":1}', '{"b":1}'),
    ({"enum": ["red", "green", 3]}, '"green"', '"blue"'),
    ({"const": {"a": [1, 2]}}, '{"a":[1,2]}', '{"a":[1]}'),
    ({"anyOf": [{"type": "string", "maxLength": 2}, {"type": "integer"}]}, "12", '"abc"'),
    ({"oneOf": [{"type": "string"}, {"type": "null"}]}, "null", "1"),
    ({"oneOf": [{"enum": [1, 2]}, {"enum": [3]}]}, "3", "4"),
    (PET, '{"kind":"dog","bark":true}', '{"kind":"cow"}'),
    (TREE, '{"v":1,"kids":[{"v":2,"kids":[]}]}', '{"v":1,"kids":[{"v":2}]}'),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, "[1,2]", "[1]"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, "[1,2,3]", "[1,2,3,4]"),
    ({"type": "string", "minLength": 2, "maxLength": 3}, '"abc"', '"abcd"'),
    ({"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"}, '"AB-12"', '"ab-12"'),
    ({"type": "integer", "minimum": 10, "exclusiveMaximum": 20}, "19", "20"),
    ({"type": "number", "minimum": -1.5, "maximum": 2.5}, "2.25", "2.75"),
    ({"type": "string", "format": "date"}, '"2024-02-29"', '"2024-13-01"'),
    ({"type": "string", "format": "date-time"}, '"2024-02-29T10:20:30Z"', '"2024-02-29 10:20"'),
    ({"type": "string", "format": "email"}, '"ada@example.org"', '"ada"'),
    ({"type": "string", "format": "uuid"}, '"123e4567-e89b-12d3-a456-426614174000"', '"123e4567"'),
    ({"type": "array", "uniqueItems": False}, "[1,1]", "[1, 1]"),
    ({"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"n": {"type": "integer"}},
      "type": "array", "items": {"$ref": "#/definitions/n"}}, "[1]", '["a"]'),
    ({"properties": {"not": {"type": "integer"}}}, '{"not":1}', '{"not":"x"}'),
]


@pytest.mark.parametrize(("schema", "good", "bad"), ENFORCED)
def test_grammar_enforces_schema(compiler, schema, good, bad):
    assert matches(compiler, schema, good)
    assert not matches(compiler, schema, bad)
    validate_output(schema, good)


BAD_SCHEMAS = [  # (schema, a fragment the 400 message must contain)
    (7, "JSON object or boolean"),
    ({"type": "nope"}, "at type"),
    ({"minLength": -1}, "at minLength"),
    ({"required": "a"}, "at required"),
    ({"properties": []}, "at properties"),
    ({"type": "object", "properties": {"a": {"type": 5}}}, "at properties/a/type"),
    ({"pattern": "["}, "invalid regular expression"),
    ({"$ref": "#/$defs/missing"}, "points nowhere"),
    ({"$ref": "#missing"}, "points nowhere"),
    ({"maximum": float("nan")}, "not plain JSON"),
    ({"items": [{"type": "integer"}]}, "at items"),  # tuple form is draft-07, not 2020-12
]


@pytest.mark.parametrize(("schema", "fragment"), BAD_SCHEMAS)
def test_invalid_schema_is_400(compiler, schema, fragment):
    with pytest.raises(BadRequest, match=None) as caught:
        compiler.compile_json(schema)
    assert fragment in caught.value.message
    assert caught.value.status == 400


SUPERSETS = [  # (schema, what the grammar says it loosened): served, then every answer validated exactly
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"minLength": 2}, "else": {"type": "integer"}}, "if"),
    ({"type": "array", "contains": {"type": "integer"}, "minContains": 2}, "contains"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"dependentRequired": {"a": ["b"]}, "dependentSchemas": {"a": {}}}, "dependentRequired"),
    ({"propertyNames": {"maxLength": 3}}, "propertyNames"),
    ({"unevaluatedProperties": False}, "unevaluatedProperties"),
    ({"properties": {"deep": {"items": {"not": {}}}}}, "not"),
    ({"$defs": {"a": {"$dynamicAnchor": "x"}}, "$dynamicRef": "#x"}, "$dynamic"),
    ({"type": "string", "format": "color"}, "Unknown format: color"),
    ({"oneOf": [{"type": "integer"}, {"minimum": 2}]}, "oneOf"),
    ({"type": "object", "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}, "oneOf"),
    ({"$id": "x", "type": "object", "properties": {"child": {"$ref": "#", "maxProperties": 2}}},
     "keywords beside a recursive $ref"),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "minProperties": 1},
     "minProperties/maxProperties"),
]


@pytest.mark.parametrize(("schema", "loosened"), SUPERSETS)
def test_schema_the_grammar_cannot_enforce_exactly_is_served_as_a_superset(compiler, schema, loosened):
    grammar = compiler.compile_json(schema)
    assert any(loosened in reason for reason in grammar.loosened), grammar.loosened


def test_exact_grammars_loosen_nothing(compiler):
    for schema in ({"type": "object", "properties": {"a": {"type": "integer"}}},
                   {"oneOf": [{"type": "integer"}, {"type": "string"}]}, {"type": "string", "format": "email"}):
        assert compiler.compile_json(schema).loosened == ()


UNSUPPORTED = [  # (schema, fragments the 422 message must contain): what no grammar or validator can serve
    ({"$ref": "https://example.com/schema.json"}, ["Only local $refs"]),
    ({"type": "string", "pattern": "^(?=a)"}, ["cannot be checked safely", "lookaround", "(?="]),
    ({"type": "string", "pattern": "^\\p{Letter}+$"}, ["cannot be checked safely", "\\p{Letter}"]),
    (False, ["allows no value"]),
    ({"type": "integer", "minimum": 5, "maximum": 1}, ["No JSON value can satisfy"]),
    ({"$schema": "http://json-schema.org/draft-03/schema#"}, ["draft-03"]),
    ({"$schema": "https://example.com/my-meta"}, ["Unsupported $schema"]),
]


@pytest.mark.parametrize(("schema", "fragments"), UNSUPPORTED)
def test_unenforceable_schema_is_422_naming_the_problem(compiler, schema, fragments):
    with pytest.raises(Unprocessable) as caught:
        compiler.compile_json(schema)
    assert caught.value.status == 422
    for fragment in fragments:
        assert fragment in caught.value.message


OBJ_A = {"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]}
OBJ_B = {"type": "object", "properties": {"k": {"enum": ["b", "c"]}}, "required": ["k"]}
ONE_OF = [  # (branches, whether they are provably exclusive)
    ([{"type": "string"}, {"type": "integer"}, {"type": "null"}], True),
    ([{"const": 1}, {"const": 2.5}, {"enum": ["1", True]}], True),
    ([{"const": {"a": 1}}, {"const": {"a": 1.0}}], False),  # equal in JSON Schema
    ([{"const": 1}, {"enum": [2, 1.0]}], False),
    ([OBJ_A, OBJ_B], True),
    ([{"$ref": "#/$defs/a"}, {"$ref": "#/$defs/b"}], True),
    ([{"type": "object", "required": ["x"]}, {"type": "object", "additionalProperties": False}], True),
    ([{"required": ["x"]}, {"additionalProperties": False}], False),  # 5 matches both
    ([{"type": "integer"}, {"type": "number"}], False),
    ([{"type": "string", "pattern": "^a"}, {"type": "string", "pattern": "^b"}], False),  # not proven
    ([{"$ref": "#/$defs/a", "minProperties": 1}, OBJ_B], True),  # llguidance proves this one itself
    ([{"const": f"v{i}"} for i in range(300)], True),
]


@pytest.mark.parametrize(("branches", "exclusive"), ONE_OF)
def test_one_of_is_exact_only_when_branches_are_exclusive(compiler, branches, exclusive):
    """Exclusive branches: anyOf enforces oneOf exactly. Others: served as a superset, answers checked exactly."""
    loosened = compiler.compile_json({"oneOf": branches, "$defs": {"a": OBJ_A, "b": OBJ_B}}).loosened
    assert any("oneOf" in reason for reason in loosened) == (not exclusive)


def test_size_limit_is_400():
    small = byte_compiler(max_schema_bytes=200)
    with pytest.raises(BadRequest, match="bytes; the limit is 200"):
        small.compile_json({"enum": ["x" * 50] * 5})


@pytest.mark.parametrize("depth", [33, 100_000])
def test_depth_limit_is_400_without_recursion(compiler, depth):
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"items": schema}
    with pytest.raises(BadRequest, match="levels deep; the limit is 32"):
        compiler.compile_json(schema)


def test_compile_time_limit_is_422_and_remembered():
    slow = byte_compiler(compile_timeout_s=0.001)
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2000)}}
    with pytest.raises(Unprocessable, match="longer than 0.001 s"):
        slow.compile_json(schema)
    started = time.perf_counter()
    with pytest.raises(Unprocessable, match="longer than"):
        slow.compile_json(schema)
    assert time.perf_counter() - started < 0.05
    slow.close()


def test_cache_returns_the_same_grammar_and_evicts_least_recent():
    small = byte_compiler(cache_size=2)
    first = small.compile_json({"type": "integer"})
    assert small.compile_json({"type": "integer"}) is first
    small.compile_json({"type": "string"})
    small.compile_json({"type": "integer"})  # refreshes integer, so string is the least recent
    small.compile_json({"type": "boolean"})
    assert small.cache_info() == {"size": 2, "max_size": 2}
    assert small.compile_json({"type": "integer"}) is first


def test_failures_are_cached_but_raised_afresh(compiler):
    errors = []
    for _ in range(2):
        with pytest.raises(Unprocessable) as caught:
            compiler.compile_json({"$ref": "https://example.com/elsewhere.json"})
        errors.append(caught.value)
    assert errors[0] is not errors[1]


def test_state_allows_eos_only_when_the_value_is_complete(compiler):
    state = compiler.compile_json({"type": "array", "items": {"type": "integer"}}).new_state()
    for token in b"[1,2]":
        logits = np.zeros(EOS + 1, dtype=np.float32)
        state.mask_logits(logits)
        assert not np.isfinite(logits[EOS])
        assert not state.is_accepting()
        state.accept(token)
    assert state.is_accepting() and state.is_finished()
    logits = np.zeros(EOS + 1, dtype=np.float32)
    state.mask_logits(logits)
    assert np.flatnonzero(np.isfinite(logits)).tolist() == [EOS]


def test_top_level_number_is_accepting_before_finished(compiler):
    state = compiler.compile_json({"type": "integer"}).new_state()
    state.accept(ord("4"))
    assert state.is_accepting() and not state.is_finished()


def test_forbidden_token_raises(compiler):
    state = compiler.compile_json({"type": "object"}).new_state()
    with pytest.raises(GenerationFailed, match="not allowed"):
        state.accept(ord("["))


def test_states_are_independent(compiler):
    grammar = compiler.compile_json({"type": "array"})
    one, two = grammar.new_state(), grammar.new_state()
    one.accept(ord("["))
    two.accept(ord("["))
    one.accept(ord("]"))
    assert one.is_finished() and not two.is_finished()


def reference_mask(logits: np.ndarray, mask: np.ndarray, vocab_size: int) -> np.ndarray:
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little").astype(bool)[:vocab_size]
    expected = np.full_like(logits, -np.inf)
    n = min(len(logits), vocab_size)
    expected[:n] = np.where(bits[:n], logits[:n], -np.inf)
    return expected


@pytest.mark.parametrize("density", [0.0, 0.001, 0.3, 0.7, 0.999, 1.0])
@pytest.mark.parametrize(("n_logits", "vocab_size"), [(1000, 1000), (1024, 1000), (1000, 1024), (40_000, 40_000),
                                                     (40_032, 39_990), (39_990, 40_032)])
def test_apply_bitmask_matches_reference(density, n_logits, vocab_size):
    rng = np.random.default_rng(7)
    bits = rng.random((vocab_size + 31) // 32 * 32) < density
    mask = np.packbits(bits, bitorder="little").view(np.int32).copy()
    logits = rng.standard_normal(n_logits).astype(np.float32)
    expected = reference_mask(logits, mask, vocab_size)
    apply_bitmask(logits, mask, vocab_size)
    np.testing.assert_array_equal(logits, expected)


def test_validate_output_returns_the_value():
    assert validate_output({"type": "object", "required": ["a"]}, '{"a": [1, 2]}') == {"a": [1, 2]}


@pytest.mark.parametrize(("schema", "text", "fragment"), [
    ({"type": "object"}, '{"a": [1, ', "cut off"),
    ({"type": "object"}, '{"a" 1}', "not valid JSON"),
    (None, "[1]", "not a JSON object"),
    ({"type": "number"}, "NaN", "not valid JSON"),
    ({"type": "number"}, "1e400", "out of range"),
    ({"type": "object", "properties": {"a": {"maximum": 3}}}, '{"a": 4}', "at a: 4 is greater than"),
    ({"type": "string", "format": "date-time"}, '"2024-13-01T00:00:00Z"', "date-time"),
    ({"type": "string", "format": "date"}, '"2021-02-29"', "date"),
])
def test_validate_output_fails_clearly(schema, text, fragment):
    with pytest.raises(GenerationFailed) as caught:
        validate_output(schema, text)
    assert fragment in caught.value.message


def test_check_schema_honours_declared_draft():
    check_schema({"$schema": "http://json-schema.org/draft-07/schema#", "items": [{"type": "integer"}]})
    with pytest.raises(BadRequest, match="at items"):
        check_schema({"items": [{"type": "integer"}]})


KEYWORDS = ["type", "properties", "items", "prefixItems", "anyOf", "oneOf", "allOf", "$ref", "$defs", "enum",
            "const", "required", "minLength", "maxItems", "pattern", "format", "minimum", "multipleOf", "not",
            "additionalProperties", "patternProperties", "$schema", "$id", "$anchor", "x-guidance", "a"]
JSON_LEAVES = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) \
    | st.sampled_from(["string", "integer", "object", "#", "#/$defs/a", "date", "^a+$", "(", "array"])
JUNK = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(KEYWORDS), inner, max_size=5), max_leaves=25)
JUNK_SCHEMAS = JUNK | st.dictionaries(st.sampled_from(KEYWORDS), JUNK, max_size=6)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=JUNK_SCHEMAS)
def test_junk_schemas_only_ever_raise_400_or_422(compiler, schema):
    try:
        grammar = compiler.compile_json(schema)
    except (BadRequest, Unprocessable):
        return
    grammar.new_state().mask_logits(np.zeros(EOS + 1, dtype=np.float32))
