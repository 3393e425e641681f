"""Personality files: the shipped ones are valid; a bad file stops start-up naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import create_app
from llm.errors import ConfigError, NotFound
from llm.personalities import PersonalityRegistry

ROOT = Path(__file__).parent.parent
GOOD = """name = "{name}"
description = "d"
intro = "i"
system_prompt = "s"
[sampling]
temperature = 0.5
top_p = 0.9
repeat_penalty = 1.1
max_tokens = 10
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_personalities_are_valid():
    registry = PersonalityRegistry(ROOT / "personalities")
    names = [p.name for p in registry.all()]
    assert len(names) >= 3 and "francais" in names
    assert registry.get("francais").language == "fr"
    assert registry.get("guide").knowledge[0].is_file()


@pytest.mark.parametrize("text, needle", [
    (GOOD.replace('intro = "i"\n', ""), "'intro' is a required property"),
    (GOOD.replace("temperature = 0.5", "temperature = 9"), "sampling/temperature"),
    (GOOD.replace("max_tokens = 10", "max_tokens = 10\ncolour = 1"), "colour"),
    ('history = { policy = "forget" }\n' + GOOD, "history/policy"),
    (GOOD.replace('name = "{name}"', 'name = "someone-else"'), "must equal the file name"),
    ("name = ", "cannot be read"),
    ('knowledge = ["missing.md"]\n' + GOOD, "does not exist"),
])
def test_bad_file_names_file_and_field(tmp_path, text, needle):
    path = write(tmp_path, "bad", text.replace("{name}", "bad"))
    with pytest.raises(ConfigError) as info:
        PersonalityRegistry(tmp_path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_bad_file_stops_app_start_up(tmp_path, model_file, fake_engine):
    write(tmp_path, "bad", GOOD.replace("{name}", "bad").replace('description = "d"\n', ""))
    with pytest.raises(ConfigError, match="bad.toml.*description"):
        create_app({"LLM_PERSONALITIES_DIR": str(tmp_path), "LLM_MODEL_FILE": model_file}, engine=fake_engine)


def test_edits_are_reloaded_and_bad_edits_keep_the_last_good_set(tmp_path):
    path = write(tmp_path, "one", GOOD.replace("{name}", "one"))
    registry = PersonalityRegistry(tmp_path)
    write(tmp_path, "two", GOOD.replace("{name}", "two"))
    assert [p.name for p in registry.all()] == ["one", "two"]
    path.write_text("broken =", encoding="utf-8")
    assert [p.name for p in registry.all()] == ["one", "two"]
    with pytest.raises(NotFound, match="Unknown personality 'three'"):
        registry.get("three")
