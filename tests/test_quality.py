"""The default set-up answers everyday questions: the shipped ``assistant`` on the embedded model.

Greedy decoding (temperature 0 through /v1) makes the answers deterministic; a clear majority is required, not
perfection, so a model or personality change that keeps the default useful never fails it.
"""

from __future__ import annotations

import re

import pytest

from bench.eval_cases import EVERYDAY

pytestmark = pytest.mark.integration
EASY = ["What is the capital of France?", "What is the capital of Japan?", "What is 2 + 2?",
        "How many days are there in a week?", "What do bees make?", "What colour is the sky on a clear day?",
        "What is the opposite of hot?", "Which planet do we live on?"]


@pytest.fixture(scope="module")
def shipped_app(tmp_path_factory):
    from app import create_app

    database = tmp_path_factory.mktemp("quality") / "conversations.db"
    app = create_app({"TESTING": True, "DATABASE_URL": f"sqlite:///{database}", "LLM_CPU_THREADS": 2,
                      "LLM_PARALLEL": 2, "LLM_CONTEXT_WINDOW": 1024})
    yield app
    app.extensions["llm"].engine.close()


def test_a_clear_majority_of_easy_questions_answered(shipped_app):
    client, patterns = shipped_app.test_client(), dict(EVERYDAY)
    right, answers = 0, {}
    for question in EASY:
        response = client.post("/v1/chat/completions", json={
            "model": "assistant", "temperature": 0, "messages": [{"role": "user", "content": question}]})
        assert response.status_code == 200, response.get_json()
        choice = response.get_json()["choices"][0]
        answers[question] = choice["message"]["content"]
        assert choice["finish_reason"] == "stop", answers[question]  # ends by itself, well before max_tokens
        right += re.search(patterns[question], answers[question], re.IGNORECASE) is not None
    assert right >= 6, answers
