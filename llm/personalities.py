"""Personalities: named system prompts with their own settings, one TOML file each, validated at load.

A bad file stops start-up with the file name and the JSON path of the offending field, because a typo in
a personality should never reach a user as a strange answer. The registry reloads files whose modification
time changed, so feeds and prompts can be edited without a restart.
"""

from __future__ import annotations

import json
import logging
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from llm.errors import ConfigError, NotFound

log = logging.getLogger(__name__)

# The schema is part of the code: personality directories elsewhere are validated against this one.
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "personalities" / "schema.json"


@dataclass(frozen=True)
class ModelChoice:
    """Where a personality's model comes from: a GGUF, or remote upstreams; all empty means the service's default
    model."""

    upstreams: tuple[str, ...] = ()  # as written: "url", "url|key" or "url|$VARIABLE" (see llm.engine.remote)
    tokenizer: str | None = None  # the upstreams' tokenizer read here (a GGUF or a tokenizer.json)
    file: str | None = None
    huggingface_repo: str | None = None
    huggingface_file: str | None = None
    context_window: int | None = None

    @property
    def is_default(self) -> bool:
        return self.file is None and self.huggingface_repo is None and not self.upstreams


@dataclass(frozen=True)
class Personality:
    """One validated personality file."""

    name: str
    description: str
    system_prompt: str
    intro: str
    sampling: dict[str, Any]
    language: str = "en"
    declares_language: bool = False  # the file names its language (then the chat page speaks it too)
    include_date: bool = False
    history_policy: str = "trim"
    model: ModelChoice = field(default_factory=ModelChoice)
    feeds: tuple[dict[str, Any], ...] = ()
    knowledge: tuple[Path, ...] = ()
    knowledge_bases: tuple[str, ...] = ()  # "owner/base", searched for everyone
    grounding: str = "always"  # "model": the model decides what to look up (llm.conversation.grounding)
    path: Path | None = None

    def public(self) -> dict[str, Any]:
        """What clients may see (no system prompt: operators may keep it private)."""
        return {
            "name": self.name,
            "description": self.description,
            "intro": self.intro,
            "language": self.language,
            "interface_language": self.language if self.declares_language else None,
        }


def _format_error(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
    return f"field '{where}': {error.message}"


def parse_personality(path: Path, validator: jsonschema.protocols.Validator) -> Personality:
    """Read and validate one file; raises ConfigError naming the file and the field."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Personality file {path}: cannot be read: {exc}") from None
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        details = "; ".join(_format_error(error) for error in errors[:5])
        raise ConfigError(f"Personality file {path}: {details}")
    if data["name"] != path.stem:
        raise ConfigError(f"Personality file {path}: field 'name' is {data['name']!r} but must equal the file name "
                          f"{path.stem!r}")
    knowledge = tuple((path.parent / item).resolve() for item in data.get("knowledge", ()))
    for file in knowledge:
        if not file.is_file():
            raise ConfigError(f"Personality file {path}: field 'knowledge': file {file} does not exist")
    model = dict(data.get("model", {}))
    if model.get("upstreams"):
        if "file" in model or "huggingface_repo" in model:
            raise ConfigError(f"Personality file {path}: field 'model': upstreams and a model file exclude each "
                              f"other")
        from llm.engine.remote import parse_upstreams

        model["upstreams"] = tuple(model["upstreams"])
        parse_upstreams(model["upstreams"], f"Personality file {path}: field 'model/upstreams'")  # keys exist
        if "tokenizer" in model:
            model["tokenizer"] = str((path.parent / model["tokenizer"]).resolve())
            if not Path(model["tokenizer"]).is_file():
                raise ConfigError(f"Personality file {path}: field 'model/tokenizer': file {model['tokenizer']} "
                                  f"does not exist")
    elif "tokenizer" in model:
        raise ConfigError(f"Personality file {path}: field 'model/tokenizer' is for upstreams only")
    return Personality(
        name=data["name"],
        description=data["description"],
        system_prompt=data["system_prompt"].strip(),
        intro=data["intro"].strip(),
        sampling=dict(data["sampling"]),
        language=data.get("language", "en"),
        declares_language="language" in data,
        include_date=data.get("include_date", False),
        history_policy=data.get("history", {}).get("policy", "trim"),
        model=ModelChoice(**model),
        feeds=tuple(data.get("feeds", ())),
        knowledge=knowledge,
        knowledge_bases=tuple(data.get("knowledge_bases", ())),
        grounding=data.get("grounding", "always"),
        path=path,
    )


def load_validator(schema_path: Path = SCHEMA_PATH) -> jsonschema.protocols.Validator:
    """The validator for personality files."""
    try:
        schema = json.loads(schema_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Personality schema {schema_path}: cannot be read: {exc}") from None
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


class PersonalityRegistry:
    """All personalities of a directory; reloads changed files on access, keeps the last good set on error."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser().resolve()
        if not self.directory.is_dir():
            raise ConfigError(f"LLM_PERSONALITIES_DIR: {self.directory} is not a directory")
        self._validator = load_validator()
        self._lock = threading.Lock()
        self._stamp: tuple = ()
        self._items: dict[str, Personality] = {}
        self._reload(strict=True)

    def _current_stamp(self) -> tuple:
        files = sorted(self.directory.glob("*.toml"))
        return tuple((file.name, file.stat().st_mtime_ns) for file in files)

    def _reload(self, strict: bool) -> None:
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return
        try:
            items = {}
            for name, _ in stamp:
                personality = parse_personality(self.directory / name, self._validator)
                items[personality.name] = personality
            if not items:
                raise ConfigError(f"No personality files (*.toml) in {self.directory}")
        except ConfigError as exc:
            if strict:
                raise
            # A broken edit while running keeps the last good set; the next start-up will stop on it.
            log.error("personalities not reloaded: %s", exc)
            self._stamp = stamp
            return
        self._items, self._stamp = items, stamp

    def refresh(self) -> None:
        """Pick up edited, added or removed files."""
        with self._lock:
            self._reload(strict=False)

    def get(self, name: str) -> Personality:
        self.refresh()
        try:
            return self._items[name]
        except KeyError:
            raise NotFound(f"Unknown personality '{name}'. Known: {', '.join(sorted(self._items))}.") from None

    def all(self) -> list[Personality]:
        self.refresh()
        return [self._items[name] for name in sorted(self._items)]
