"""The settings table: parsing, errors naming the variable, and the README kept in sync."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.errors import ConfigError
from llm.settings import load_settings, settings_table_markdown


def test_defaults():
    settings = load_settings({})
    assert settings.port == 5000 and settings.host == "127.0.0.1"
    assert settings.gpu_layers is None  # auto
    assert settings.cpu_threads >= 1
    assert settings.cache_tokens == settings.context_window * settings.parallel


@pytest.mark.parametrize("env, value, attr, expected", [
    ("LLM_GPU_LAYERS", "all", "gpu_layers", -1),
    ("LLM_GPU_LAYERS", "12", "gpu_layers", 12),
    ("LLM_GPU_LAYERS", "auto", "gpu_layers", None),
    ("LLM_CONTEXT_WINDOW", "8192", "context_window", 8192),
    ("LLM_CPU_THREADS", "3", "cpu_threads", 3),
    ("LLM_API_KEYS", "a, b,,c", "api_keys", ("a", "b", "c")),
    ("LLM_LOG_TRANSCRIPTS", "yes", "log_transcripts", True),
    ("LLM_HUGGINGFACE_FILE", "*Q8_0.gguf", "huggingface_file", "*Q8_0.gguf"),
])
def test_parsing(env, value, attr, expected):
    assert getattr(load_settings({env: value}), attr) == expected


@pytest.mark.parametrize("env, value", [
    ("LLM_CONTEXT_WINDOW", "lots"),
    ("LLM_CONTEXT_WINDOW", "10"),
    ("LLM_GPU_LAYERS", "-5"),
    ("LLM_CPU_THREADS", "0"),
    ("PORT", "70000"),
    ("LLM_LOG_TRANSCRIPTS", "maybe"),
])
def test_invalid_values_name_the_variable(env, value):
    with pytest.raises(ConfigError, match=env):
        load_settings({env: value})


def test_overrides_win_over_environment():
    assert load_settings({"LLM_PARALLEL": "2"}, {"LLM_PARALLEL": 3}).parallel == 3


def test_readme_table_matches_code():
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    assert settings_table_markdown() in readme, "regenerate the README settings table from llm.settings"
