"""JSON Schema checks that need no tokenizer: limits, meta-validation, keyword screening and output validation.

``llm.engine.constraints`` turns a schema into a token-level grammar; this module decides beforehand whether a schema
is acceptable at all (400 for a broken one, 422 for one the grammar engine cannot enforce) and checks the final
text against the schema, so an answer is never returned unvalidated.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import math
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import llguidance
import regress
from jsonschema import validators
from jsonschema.exceptions import ValidationError

from llm import safe_regex
from llm.errors import BadRequest, GenerationFailed, Unprocessable

# Where subschemas live, so keyword screening never mistakes a property *named* "not" for the keyword.
_SCHEMA_VALUED = ("additionalProperties", "items", "additionalItems", "not", "if", "then", "else", "contains",
                  "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")

_MAX_PAIRWISE_BRANCHES = 128  # proving disjointness is quadratic; beyond this, oneOf needs const/enum branches
_COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_UNSUPPORTED_DRAFTS = ("http://json-schema.org/draft-03/schema",)
_TIME = r"(?P<h>\d{2}):(?P<mi>\d{2}):(?P<s>\d{2})(?:\.\d+)?(?:[Zz]|[+-](?P<oh>\d{2}):(?P<om>\d{2}))"
_RFC3339_TIME = re.compile(_TIME, re.ASCII)
_RFC3339 = re.compile(r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})[Tt]" + _TIME, re.ASCII)
_JSON_TYPES = frozenset({"null", "boolean", "object", "array", "string", "number"})


def canonical_json(schema: Any) -> str:
    """Compact JSON text of a schema: the cache key and the size measure (key order kept: it orders output)."""
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"The schema is not plain JSON: {exc}", param="schema") from None


def json_depth(value: Any) -> int:
    """Nesting depth of objects and arrays, computed without recursion so deep input cannot overflow the stack."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return deepest


def check_limits(schema: Any, *, max_bytes: int, max_depth: int) -> str:
    """Reject schemas too large or too deep before any parser sees them; returns the canonical text."""
    if not isinstance(schema, dict | bool):
        raise BadRequest(f"The schema must be a JSON object or boolean, not {type(schema).__name__}.",
                         param="schema")
    depth = json_depth(schema)
    if depth > max_depth:
        raise BadRequest(f"The schema is nested {depth} levels deep; the limit is {max_depth}.", param="schema")
    text = canonical_json(schema)
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise BadRequest(f"The schema is {size} bytes; the limit is {max_bytes}.", param="schema")
    return text


def _validator_class(schema: dict | bool) -> type:
    """The jsonschema validator for the schema's declared draft (2020-12 when it declares none)."""
    if not isinstance(schema, dict) or "$schema" not in schema:
        return jsonschema.Draft202012Validator
    declared = schema["$schema"]
    if not isinstance(declared, str):
        raise BadRequest(f"Not a valid JSON Schema at $schema: {declared!r} is not a URI string.", param="schema")
    cls = validators.validator_for(schema, default=None)
    if cls is None:
        raise Unprocessable(f"Unsupported $schema {declared!r}: use a JSON Schema draft URI (2020-12 "
                            "recommended).", param="schema")
    return cls


def check_schema(schema: Any, *, max_bytes: int = 64_000, max_depth: int = 32) -> None:
    """Meta-validate against the declared draft (default 2020-12), so a malformed schema gets a 400 naming it.

    Size and depth are checked first: the meta-validator recurses, and a hostile schema must not make it overflow.
    """
    check_limits(schema, max_bytes=max_bytes, max_depth=max_depth)
    cls = _validator_class(schema)
    # No format checker here: its "regex" check is Python's re, stricter than ECMA; check_patterns decides.
    error = jsonschema.exceptions.best_match(cls(cls.META_SCHEMA).iter_errors(schema))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise BadRequest(f"Not a valid JSON Schema at {where}: {error.message}", param="schema")
    check_patterns(schema)
    if isinstance(schema, dict) and str(schema.get("$schema", "")).rstrip("#") in _UNSUPPORTED_DRAFTS:
        raise Unprocessable("JSON Schema draft-03 is not supported; use draft-04 or later.", param="schema")


def subschemas(schema: Any) -> Iterator[dict]:
    """Every object subschema reachable through applicator keywords (not through enum, const, default...)."""
    return (node for _, node in located_subschemas(schema))


def located_subschemas(schema: Any) -> Iterator[tuple[str, dict]]:
    """Every object subschema with its JSON pointer in the schema ("" for the root), for messages that say where."""
    stack = [("", schema)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        yield path, node
        for key in _SCHEMA_VALUED:
            if isinstance(node.get(key), dict):
                stack.append((f"{path}/{key}", node[key]))
        for key in _SCHEMA_LISTS:
            if isinstance(node.get(key), list):
                stack.extend((f"{path}/{key}/{index}", item) for index, item in enumerate(node[key]))
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                stack.extend((f"{path}/{key}/{_escape(name)}", item) for name, item in node[key].items())


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


# Keywords beside a $ref that only annotate, or that the $ref's resolution itself needs.
_REF_NEIGHBOURS = frozenset({"$ref", "$id", "$schema", "$anchor", "$comment", "$defs", "definitions", "title",
                             "description", "default", "examples", "deprecated", "readOnly", "writeOnly"})


def normalise(schema: Any) -> Any:
    """A copy llguidance reads as intended: ``uniqueItems: false`` dropped, counts like ``2.0`` made integers."""
    if not isinstance(schema, dict):
        return schema
    schema = json.loads(json.dumps(schema))
    for node in subschemas(schema):
        if node.get("uniqueItems") is False:
            del node["uniqueItems"]
        for key in _COUNT_KEYWORDS:
            if isinstance(node.get(key), float) and node[key].is_integer():
                node[key] = int(node[key])
    return schema


def without_keywords(schema: dict, keywords: frozenset[str]) -> dict:
    """A superset for the grammar: these (narrowing) keywords dropped everywhere; the validator still checks them."""
    schema = json.loads(json.dumps(schema))
    for node in subschemas(schema):
        for key in keywords & node.keys():
            del node[key]
    return schema


def without_ref_siblings(schema: dict) -> dict:
    """A superset for the grammar: keywords beside each ``$ref`` dropped (they only narrow what the reference
    allows; in 2019-09 and later they apply together with it). llguidance cannot combine them with a recursive
    reference; the answer validator still checks them."""
    schema = json.loads(json.dumps(schema))
    for node in subschemas(schema):
        if isinstance(node.get("$ref"), str):
            for key in list(node.keys() - _REF_NEIGHBOURS):
                del node[key]
    return schema


def unchecked_formats(schema: Any) -> list[str]:
    """Formats in the schema that are annotations only: neither the grammar nor the answer validator knows them
    (draft 2020-12 treats an unknown format so). Clients are told in ``X-Unchecked-Formats``."""
    if not isinstance(schema, dict):
        return []
    known = _format_checker(_validator_class(schema)).checkers
    return sorted({node["format"] for node in subschemas(schema)
                   if isinstance(node.get("format"), str) and node["format"] not in known})


def _patterns(schema: Any) -> Iterator[tuple[str, str]]:
    """Every regex in a schema with where it is (the keyword and its JSON pointer)."""
    for path, node in located_subschemas(schema):
        if isinstance(node.get("patternProperties"), dict):
            yield from ((f"patternProperties key at {path or '/'}", pattern) for pattern in node["patternProperties"])
        if isinstance(node.get("pattern"), str):
            yield f"pattern at {path}/pattern", node["pattern"]


def _parses_anywhere(pattern: str) -> bool:
    """Whether Python's parser or the grammar engine's reads the pattern (compiling never runs it: no ReDoS)."""
    try:
        re.compile(pattern)
        return True
    except (re.error, OverflowError, RecursionError):
        return not llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_regex(pattern))


def check_patterns(schema: Any) -> None:
    """400 for a regex that is not a regex; 422 for one the answer validator cannot run in linear time (RE2)."""
    for where, pattern in _patterns(schema):
        if safe_regex.is_valid(pattern):
            continue
        if not _parses_anywhere(pattern):
            raise BadRequest(f"The schema has an invalid regular expression in {where}: {pattern!r}", param="schema")
        safe_regex.require(pattern, where)


class _Shapes:
    """Conservative facts about subschemas (types, finite value sets) used to prove oneOf branches disjoint."""

    def __init__(self, root: dict):
        self.root = root
        # An embedded $id changes what "#/..." means below it; then no $ref is followed at all.
        self.follow_refs = not any("$id" in node for node in subschemas(root) if node is not root)

    def resolve(self, node: Any) -> Any:
        """Follow plain local ``#/...`` refs; None ("unknown") for anything else, siblings or cycles."""
        seen: set[str] = set()
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            plain = isinstance(ref, str) and (ref == "#" or ref.startswith("#/")) and ref not in seen
            if not (plain and self.follow_refs) or node.keys() - {"$ref", "$comment", "title", "description"}:
                return None
            seen.add(ref)
            node = self._pointer(ref[1:])
        return node

    def _pointer(self, pointer: str) -> Any:
        node: Any = self.root
        for part in [p for p in pointer.split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def types(self, node: Any, depth: int = 0) -> frozenset:
        """JSON types a subschema admits ("integer" counted as "number"), all types when unsure."""
        node = self.resolve(node)
        if not isinstance(node, dict) or depth > 16:
            return _JSON_TYPES if node is not False else frozenset()
        found = _JSON_TYPES
        if "type" in node:
            declared = node["type"] if isinstance(node["type"], list) else [node["type"]]
            found = frozenset("number" if t == "integer" else t for t in declared) & _JSON_TYPES
        values = self.values(node)
        if values is not None:
            found &= frozenset(kind for kind, _ in values)
        for branch in node.get("allOf", []):
            found &= self.types(branch, depth + 1)
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                found &= frozenset().union(*(self.types(b, depth + 1) for b in node[key]))
        return found

    def values(self, node: Any) -> frozenset | None:
        """The finite set of values a subschema allows (from const/enum), or None when unbounded."""
        node = self.resolve(node)
        if not isinstance(node, dict):
            return None
        if "const" in node:
            return frozenset([_value_key(node["const"])])
        if isinstance(node.get("enum"), list):
            return frozenset(_value_key(v) for v in node["enum"])
        return None

    def disjoint(self, a: Any, b: Any) -> bool:
        """True only when no JSON value can match both subschemas."""
        a, b = self.resolve(a), self.resolve(b)
        shared = self.types(a) & self.types(b)
        if not shared:
            return True
        va, vb = self.values(a), self.values(b)
        if va is not None and vb is not None and not va & vb:
            return True
        # Property rules only separate objects: any other value both branches admit would match both.
        objects_only = shared == frozenset({"object"}) and isinstance(a, dict) and isinstance(b, dict)
        return objects_only and (self._by_property(a, b) or self._by_property(b, a))

    def _by_property(self, a: dict, b: dict) -> bool:
        """A required property of ``a`` that ``b`` forbids or pins to other values."""
        b_props = b.get("properties", {}) if isinstance(b.get("properties"), dict) else {}
        for name in a.get("required", []):
            if name not in b_props:
                if b.get("additionalProperties") is False and not b.get("patternProperties"):
                    return True
                continue
            if name in b.get("required", []) and isinstance(a.get("properties"), dict) and name in a["properties"]:
                va, vb = self.values(a["properties"][name]), self.values(b_props[name])
                if va is not None and vb is not None and not va & vb:
                    return True
        return False


def _value_key(value: Any) -> tuple[str, str]:
    """A hashable (type, value) key under JSON Schema equality (1 == 1.0, true != 1)."""
    if isinstance(value, bool):
        return ("boolean", str(value))
    if isinstance(value, int):
        return ("number", str(value))
    if isinstance(value, float):
        return ("number", str(int(value)) if value.is_integer() else repr(value))
    kind = {type(None): "null", str: "string", list: "array", dict: "object"}.get(type(value), "object")
    return (kind, json.dumps(_integral(value), sort_keys=True))


def _integral(value: Any) -> Any:
    """The value with integral floats as ints, so nested 1.0 and 1 compare equal as JSON Schema says."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(item) for item in value]
    if isinstance(value, dict):
        return {key: _integral(item) for key, item in value.items()}
    return value


def overlapping_one_of(schema: Any) -> list[str]:
    """Locations of oneOf keywords whose branches cannot be proven pairwise disjoint."""
    if not isinstance(schema, dict):
        return []
    shapes, found = _Shapes(schema), []
    for node in subschemas(schema):
        branches = node.get("oneOf")
        if isinstance(branches, list) and not _exclusive(shapes, branches):
            found.append(json.dumps(branches)[:120])
    return found


def _exclusive(shapes: _Shapes, branches: list) -> bool:
    """Whether the branches are pairwise disjoint; linear for the common all-const/enum case, else pairwise."""
    values = [shapes.values(branch) for branch in branches]
    if all(v is not None for v in values):
        return sum(map(len, values)) == len(frozenset().union(*values))
    if len(branches) > _MAX_PAIRWISE_BRANCHES:
        return False
    return all(shapes.disjoint(a, b) for i, a in enumerate(branches) for b in branches[i + 1:])


def _parse_strict(text: str) -> Any:
    """Parse JSON rejecting NaN, Infinity and numbers too large for a float (they would not round-trip)."""
    def finite(raw: str) -> float:
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(f"number {raw[:40]} is out of range")
        return value

    def reject(raw: str) -> Any:
        raise ValueError(f"{raw} is not valid JSON")

    return json.loads(text, parse_float=finite, parse_constant=reject)


def _pattern(validator, pattern, instance, schema):
    if validator.is_type(instance, "string") and not safe_regex.search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator, patterns, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if safe_regex.search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator, additional, instance, schema):
    if not validator.is_type(instance, "object"):
        return
    known = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [key for key in instance
              if key not in known and not any(safe_regex.search(pattern, key) for pattern in patterns)]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif additional is False and extras:
        yield ValidationError(f"Additional properties are not allowed ({', '.join(map(repr, sorted(extras)))} "
                              f"{'was' if len(extras) == 1 else 'were'} unexpected)")


# Every keyword that runs a client's regex, re-implemented on RE2 (jsonschema's own use Python's backtracking re).
_LINEAR_KEYWORDS = {"pattern": _pattern, "patternProperties": _pattern_properties,
                    "additionalProperties": _additional_properties}


@functools.cache
def _linear_validator(cls: type) -> type:
    """The draft's validator with regex keywords on RE2."""
    return validators.extend(cls, {k: v for k, v in _LINEAR_KEYWORDS.items() if k in cls.VALIDATORS})


def _format_checker(cls: type) -> jsonschema.FormatChecker:
    """The draft's format checker plus RFC 3339 date-time and time, which jsonschema checks only with an extra;
    the ``regex`` format is ECMA-262 syntax (JSON Schema's), parsed by regress instead of Python's re."""
    checker = copy.deepcopy(cls.FORMAT_CHECKER)
    if "regex" in checker.checkers:  # ECMA-262 syntax, parsed (never run) by regress
        checker.checks("regex")(lambda value: not isinstance(value, str) or _is_ecma_regex(value))
    for name, with_date in (("date-time", True), ("time", False)):
        if name not in checker.checkers:
            checker.checks(name)(lambda value, with_date=with_date: _is_rfc3339(value, with_date))
    # JSON Pointers by their grammars, whatever is installed: jsonschema checks them only when the jsonpointer
    # package is present, and then refuses valid relative pointers such as "100" (a zero after any digit).
    if cls not in (validators.Draft3Validator, validators.Draft4Validator):
        checker.checks("json-pointer")(lambda value: not isinstance(value, str) or bool(_POINTER.fullmatch(value)))
        if cls is not validators.Draft6Validator:
            checker.checks("relative-json-pointer")(
                lambda value: not isinstance(value, str) or bool(_RELATIVE_POINTER.fullmatch(value)))
    return checker


_POINTER = re.compile(r"(/([^~/]|~[01])*)*", re.DOTALL)  # RFC 6901
# draft-handrews-relative-json-pointer-01: a non-negative integer, then "#" or a JSON Pointer
_RELATIVE_POINTER = re.compile(r"(0|[1-9][0-9]*)(#|(/([^~/]|~[01])*)*)", re.DOTALL)


def _is_ecma_regex(value: str) -> bool:
    try:
        regress.Regex(value)
    except (regress.RegressError, ValueError):
        return False
    return True


def _is_rfc3339(value: Any, with_date: bool) -> bool:
    """RFC 3339 full date-time (or full-time): real calendar date, hh:mm:ss (leap second 60 allowed), offset."""
    if not isinstance(value, str):
        return True
    match = _RFC3339.fullmatch(value) if with_date else _RFC3339_TIME.fullmatch(value)
    if match is None:
        return False
    parts = match.groupdict()
    if with_date:
        try:
            datetime.date(int(parts["y"]), int(parts["mo"]), int(parts["d"]))
        except ValueError:
            return False
    fields = (parts["h"], parts["mi"], parts["s"], parts["oh"] or "0", parts["om"] or "0")
    return all(int(v) <= limit for v, limit in zip(fields, (23, 59, 60, 23, 59), strict=True))


def validate_output(schema: dict | bool | None, text: str) -> Any:
    """Parse and validate a generated answer; an answer that fails is an error, never returned as is."""
    try:
        value = _parse_strict(text)
    except RecursionError:
        raise GenerationFailed("The model's answer is nested too deeply to check.") from None
    except ValueError as exc:
        cut = isinstance(exc, json.JSONDecodeError) and (exc.pos >= len(text.rstrip())
                                                         or exc.msg.startswith("Unterminated string"))
        reason = "it was cut off before the JSON value was complete" if cut else f"it is not valid JSON ({exc})"
        raise GenerationFailed(f"The model's answer could not be used: {reason}.") from None
    if schema is None:
        if not isinstance(value, dict):
            raise GenerationFailed("The model's answer is not a JSON object.")
        return value
    cls = _validator_class(schema)
    try:
        validator = _linear_validator(cls)(schema, format_checker=_format_checker(cls))
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    except RecursionError:
        raise GenerationFailed("The model's answer is nested too deeply to check.") from None
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise GenerationFailed(f"The model's answer does not match the schema at {where}: {error.message}")
    return value


# Token budget estimates for a schema's largest answer (compact JSON, ~3 characters a token).
_UNBOUNDED_STRING, _UNBOUNDED_ITEMS, _OPEN_PROPERTIES, _ANY_VALUE = 64, 16, 8, 256


def token_estimate(schema: Any, root: Any = None, depth: int = 0) -> int:
    """Roughly how many tokens the largest answer to ``schema`` takes: from maxLength, maxItems, enums and the
    properties; unbounded strings count 64 tokens, unbounded arrays 16 items, open objects 8 extra properties."""
    root = schema if root is None else root
    node = _Shapes(root).resolve(schema) if isinstance(root, dict) and isinstance(schema, dict) else schema
    if not isinstance(node, dict) or depth > 6:
        return _ANY_VALUE if node is not False else 0
    if "const" in node or isinstance(node.get("enum"), list):
        values = [node["const"]] if "const" in node else node["enum"]
        return max((len(json.dumps(value)) for value in values), default=1) // 3 + 2
    branches = [b for key in ("anyOf", "oneOf", "allOf") for b in node.get(key) or () if isinstance(b, dict)]
    if branches:
        return max(token_estimate(branch, root, depth + 1) for branch in branches)
    kind = node.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    if kind == "object" or "properties" in node:
        properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        total = sum(len(name) // 3 + 2 + token_estimate(sub, root, depth + 1) for name, sub in properties.items())
        extra = node.get("additionalProperties", True)
        if extra is not False or node.get("patternProperties"):
            total += _OPEN_PROPERTIES * (4 + token_estimate(extra if isinstance(extra, dict) else {}, root,
                                                            depth + 1))
        return total + 2
    if kind == "array" or "items" in node or "prefixItems" in node:
        count = node.get("maxItems") if isinstance(node.get("maxItems"), int) else _UNBOUNDED_ITEMS
        item = node.get("items") if isinstance(node.get("items"), dict) else {}
        return 2 + count * (1 + token_estimate(item, root, depth + 1))
    if kind == "string":
        return node["maxLength"] // 2 + 2 if isinstance(node.get("maxLength"), int) else _UNBOUNDED_STRING
    if kind in ("integer", "number"):
        return 8
    if kind in ("boolean", "null"):
        return 2
    return _ANY_VALUE


def default_max_tokens(schema: Any, window: int) -> int:
    """Twice the estimate of the largest answer (room for the model's choices), at least 64, at most the window."""
    estimate = _ANY_VALUE if schema is None else token_estimate(schema)
    return max(64, min(window, 2 * estimate + 16))
