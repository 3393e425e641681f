"""Grounding decisions: before answering, the model decides whether to look anything up, where, and with which
query, in JSON its grammar makes valid (a personality's ``grounding = "model"``).

The sources offered are the ones this question could use (``rag.preprocess.Preprocessor.sources``: the user's
and the personality's knowledge bases, the personality's feeds, a web search when one is configured); the schema
lists exactly those, so the model can only choose among them. The decision is shown to the user as a status line
("Looking up documents, web: “query”"). A decision that cannot be read (the model ran out of tokens, the engine
failed) falls back to the defaults, so a question is never lost to its own planning.
"""

from __future__ import annotations

import json
import logging

from llm.engine import Engine, GenerationRequest, JsonConstraint, SamplingParams
from llm.errors import ServiceError
from llm.models import ModelSpec
from rag.preprocess import Plan

log = logging.getLogger(__name__)
PLAN_TOKENS = 96
QUERY_CHARACTERS = 200
INSTRUCTIONS = (
    "Before the question below is answered, decide whether answering it well needs information from these "
    "sources, and which ones:\n{listing}\n"
    "Reply in JSON: \"retrieve\" (true or false), \"sources\" (the names of the sources to consult, from the "
    "list) and \"query\" (a short search query for them, in the question's language).")


def schema(sources: dict[str, str]) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["retrieve", "sources", "query"],
            "properties": {"retrieve": {"type": "boolean"},
                           "sources": {"type": "array", "items": {"enum": sorted(sources)}, "uniqueItems": True,
                                       "maxItems": len(sources)},
                           "query": {"type": "string", "maxLength": QUERY_CHARACTERS}}}


def decide(engine: Engine, spec: ModelSpec, owner: str, question: str, sources: dict[str, str]) -> Plan | None:
    """The model's decision for ``question`` among ``sources``, or None when it could not be had."""
    listing = "\n".join(f"- {name}: {description}" for name, description in sources.items())
    request = GenerationRequest(
        model=spec, owner=owner, constraint=JsonConstraint(schema(sources)),
        sampling=SamplingParams(temperature=0, max_tokens=PLAN_TOKENS, repeat_penalty=1.0),
        messages=[{"role": "system", "content": INSTRUCTIONS.format(listing=listing)},
                  {"role": "user", "content": question[:4000]}])
    try:
        handle = engine.submit(request)
        decision = json.loads(handle.text())
    except (ServiceError, ValueError) as error:
        log.info("no grounding decision (%s); the defaults apply", error)
        return None
    if not isinstance(decision, dict) or not isinstance(decision.get("sources"), list):
        return None
    chosen = frozenset(name for name in decision["sources"] if name in sources)
    query = str(decision.get("query") or "").strip()[:QUERY_CHARACTERS]
    return Plan(retrieve=bool(decision.get("retrieve")) and bool(chosen), sources=chosen, query=query)


def describe(plan: Plan | None, sources: dict[str, str]) -> str:
    """The status line the user sees."""
    if plan is None:
        return "Could not decide what to look up; using every source."
    if not plan.retrieve:
        return "Answering without looking anything up."
    names = ", ".join(name if not name.startswith("feed:") else sources[name].removeprefix("the news feed ")
                      for name in sorted(plan.sources))
    return f"Looking up {names}: “{plan.query}”" if plan.query else f"Looking up {names}."
