"""``/v1/embeddings``: OpenAI's embeddings endpoint on the service's embedding model (``llm.engine.embeddings``)."""

from __future__ import annotations

import base64
from typing import Any

from flask import Blueprint, jsonify

from llm.engine.embeddings import MAX_INPUTS
from llm.errors import BadRequest
from llm.web.api import services
from llm.web.api.openai import _model_name, _number, body

blueprint = Blueprint("embeddings", __name__, url_prefix="/v1")


@blueprint.post("/embeddings")
def embeddings():
    """Unit vectors from the service's embedding model; ``model`` is its name or any personality's."""
    data = body()
    service = services().embeddings
    name = _model_name(data)
    if name != service.name:
        services().personalities.get(name)  # a 404 in OpenAI's shape for an unknown model
    texts = embedding_inputs(data.get("input"))
    encoding = data.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be float or base64.", param="encoding_format")
    vectors, tokens = service.create(texts, _number(data, "dimensions", 1, 1 << 16, True))
    if encoding == "base64":
        encoded = [base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii") for vector in vectors]
    else:
        encoded = vectors.tolist()
    return jsonify({"object": "list", "model": service.model().name, "usage": {"prompt_tokens": tokens,
                                                                             "total_tokens": tokens},
                    "data": [{"object": "embedding", "index": index, "embedding": vector}
                             for index, vector in enumerate(encoded)]})


def embedding_inputs(value: Any) -> list[str]:
    """``input``: a string or a list of strings (token arrays are tokenizer-specific: text only)."""
    texts = [value] if isinstance(value, str) else value
    if isinstance(texts, list) and texts and all(isinstance(item, (int, list)) for item in texts):
        raise BadRequest("'input' as token ids is not supported: send text (LangChain: OpenAIEmbeddings("
                         "check_embedding_ctx_length=False)).", param="input")
    if not isinstance(texts, list) or not 1 <= len(texts) <= MAX_INPUTS or not all(
            isinstance(text, str) and text.strip() for text in texts):
        raise BadRequest(f"'input' must be a non-empty string or a list of 1 to {MAX_INPUTS} non-empty strings.",
                         param="input")
    return texts
