"""The settings table: every knob of the service, its environment variable, default and help.

The README's settings table and ``python app.py --help`` are both generated from ``SETTINGS`` so the
documentation cannot drift from the code. Values come from defaults, then the environment, then the
``config`` mapping given to ``create_app``; an invalid value stops start-up naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llm.errors import ConfigError


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(str(raw).strip())
        if minimum is not None and value < minimum:
            raise ValueError(f"must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum}")
        return value

    parse.kind = "integer"  # type: ignore[attr-defined]
    return parse


def _float(minimum: float = 0.0) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(str(raw).strip())
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    parse.kind = "number"  # type: ignore[attr-defined]
    return parse


def _bool(raw: str) -> bool:
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be one of 1/0, true/false, yes/no, on/off")


_bool.kind = "boolean"  # type: ignore[attr-defined]


def _text(raw: str) -> str | None:
    text = str(raw).strip()
    return text or None


_text.kind = "text"  # type: ignore[attr-defined]


def _one_of(*names: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = str(raw).strip().lower()
        if value not in names:
            raise ValueError(f"must be one of {', '.join(names)}")
        return value

    parse.kind = " / ".join(names)  # type: ignore[attr-defined]
    return parse


def _csv(raw: str) -> tuple[str, ...]:
    if isinstance(raw, (list, tuple)):
        return tuple(str(item).strip() for item in raw if str(item).strip())
    return tuple(part.strip() for part in str(raw).split(",") if part.strip())


_csv.kind = "comma-separated list"  # type: ignore[attr-defined]


def _gpu_layers(raw: str) -> int | None:
    text = str(raw).strip().lower()
    if text in ("", "auto"):
        return None
    if text == "all":
        return -1
    value = int(text)
    if value < -1:
        raise ValueError("must be 'auto', 'all', -1 (all) or a number of layers >= 0")
    return value


_gpu_layers.kind = "auto | all | integer"  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    env: str
    attr: str
    default: Any
    parse: Callable[[str], Any]
    help: str


def physical_cores() -> int:
    """Physical core count: llama.cpp decodes fastest with one thread per physical core, not per SMT thread."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cores, physical = set(), "0"
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical = value.strip()
                elif key == "core id":
                    cores.add((physical, value.strip()))
            if cores:
                return len(cores)
    except OSError:
        pass
    return max(1, (os.cpu_count() or 2) // 2)


SETTINGS: tuple[Setting, ...] = (
    Setting("HOST", "host", "127.0.0.1", _text, "Address the web server listens on."),
    Setting("PORT", "port", 5000, _int(1, 65535), "Port the web server listens on."),
    Setting("LLM_MODEL_FILE", "model_file", None, _text,
            "Path to a local GGUF file. Takes precedence over the Hugging Face settings."),
    Setting("LLM_HUGGINGFACE_REPO", "huggingface_repo", None, _text,
            "Hugging Face repository to download the model from (e.g. `bartowski/gemma-2-2b-it-GGUF`)."),
    Setting("LLM_HUGGINGFACE_FILE", "huggingface_file", "*Q4_K_M.gguf", _text,
            "File in that repository; wildcards allowed (first match in sorted order)."),
    Setting("LLM_GPU_LAYERS", "gpu_layers", None, _gpu_layers,
            "Layers offloaded to the GPU. `auto` (default): all when llama.cpp was built with GPU support, "
            "none otherwise; `all` or `-1`: all; `0`: CPU only."),
    Setting("LLM_UPSTREAMS", "upstreams", None, _text,
            "Serve from OpenAI-compatible upstream servers instead of a model in this process: `url` or "
            "`url|key`, comma-separated, each url ending in `/v1` (llama-server, llama-cpp-python's server, vLLM, "
            "Ollama, another instance of this service). Least-loaded routing, failover before the first token, "
            "health checks."),
    Setting("LLM_UPSTREAM_TOKENIZER", "upstream_tokenizer", None, _text,
            "The upstreams' tokenizer, read here when they offer no `/tokenize`: a GGUF of their model (only its "
            "vocabulary is loaded) or a Hugging Face `tokenizer.json`. Without either, token counts are a "
            "conservative estimate (one token per three characters, plus eight per message)."),
    Setting("LLM_UPSTREAM_TIMEOUT", "upstream_timeout", 60.0, _float(1.0),
            "Seconds an upstream may take to start answering (and between two pieces of a streamed answer)."),
    Setting("LLM_CHAT_FORMAT", "chat_format", None, _text,
            "Force a chat format (gemma, chatml, llama3, phi3) for a GGUF without a chat template whose "
            "architecture does not tell its family. Default: the GGUF's template, else its architecture."),
    Setting("LLM_TOOL_FORMAT", "tool_format", None, _text,
            "How the model is shown tools and writes calls: `hermes` (`<tool_call>` blocks), `llama3` (Meta's "
            "JSON calls) or `mistral` (`[TOOL_CALLS]`, written by the model's own template). Default: the format "
            "the GGUF's chat template shows, else `hermes`."),
    Setting("LLM_EMBEDDING_MODEL", "embedding_model", "wordllama", _text,
            "Model behind `/v1/embeddings`, loaded on first use: `wordllama` (the embedded WordLlama model, "
            "offline), a path to a GGUF embedding model (run by llama.cpp), `chat` (the chat model's mean-pooled "
            "states, a weaker fallback) or `off`."),
    Setting("LLM_CONTEXT_WINDOW", "context_window", 4096, _int(256),
            "Tokens one conversation may use: system prompt, context, history and reply share it."),
    Setting("LLM_CPU_THREADS", "cpu_threads", None, _int(1),
            "CPU threads for decoding. Default: the number of physical cores."),
    Setting("LLM_PARALLEL", "parallel", 8, _int(1, 256),
            "Sequences decoded together in one batch (continuous batching)."),
    Setting("LLM_QUEUE_SIZE", "queue_size", 32, _int(0),
            "Requests that may wait for a free sequence; beyond it requests get 503 with Retry-After."),
    Setting("LLM_CACHE_TOKENS", "cache_tokens", None, _int(256),
            "Size of the shared KV cache in tokens. Default: context window x parallel. Idle conversations "
            "stay cached in it until space is needed."),
    Setting("LLM_BATCH_TOKENS", "batch_tokens", 256, _int(16),
            "Most prompt tokens prefilled per scheduler step while other streams are generating, so long prompts do "
            "not stall them (at least 512 when none is: larger chunks prefill faster)."),
    Setting("LLM_DRAFT_TOKENS", "draft_tokens", 8, _int(0, 64),
            "Speculative decoding without a draft model: up to this many tokens per step are proposed from the "
            "answer's own context (prompt lookup) and verified in the same batch; output is unchanged. 0 turns it "
            "off; a personality turns it off with `speculative = false` in its sampling table."),
    Setting("LLM_FLASH_ATTENTION", "flash_attention", "auto", _one_of("auto", "on", "off"),
            "llama.cpp's flash attention (`auto`: llama.cpp's choice). On a CPU, `off` suits long conversations and "
            "prompts: 32 new tokens after 865 cached prefill 1.5x faster and turn 10 of a chat gets its first token "
            "sooner, while short contexts (under ~250 tokens) run 10-20% slower (docs/BENCHMARKS.md)."),
    Setting("LLM_SUSPEND_MB", "suspend_mb", 512, _int(0),
            "Memory (MiB) for the saved cache state of evicted conversations, restored instead of recomputed."),
    Setting("LLM_MAX_LOADED_MODELS", "max_loaded_models", 2, _int(1),
            "Distinct GGUF models kept loaded at once; the least recently used idle one is unloaded."),
    Setting("LLM_MODEL_CACHE_DIR", "model_cache_dir", os.path.join("~", ".cache", "llm-service"), _text,
            "Directory where the verified checksum of the embedded default model is remembered."),
    Setting("LLM_PERSONALITIES_DIR", "personalities_dir", "personalities", _text,
            "Directory of personality files (`*.toml`), validated against `personalities/schema.json`."),
    Setting("LLM_REQUEST_TIMEOUT", "request_timeout", 300, _int(1),
            "Seconds a request may wait for its answer before it is cancelled."),
    Setting("LLM_SCHEMA_ATTEMPTS", "schema_attempts", 3, _int(1, 10),
            "Answers generated for one schema-constrained request before it is a 422: when the grammar enforces the "
            "schema only as a superset (an overlapping oneOf, `not`, `uniqueItems`...), an answer that does not "
            "validate is resampled with another seed."),
    Setting("LLM_SCHEMA_TIMEOUT", "schema_timeout", 120, _int(1),
            "Default seconds for all attempts of a /toil answer (clients may ask for less or more with `timeout`, "
            "up to LLM_REQUEST_TIMEOUT)."),
    Setting("LLM_RAG_LENGTH", "rag_length", 1024, _int(0),
            "Tokens of fetched or retrieved context added to a prompt (cut at a sentence or entry boundary)."),
    Setting("LLM_KNOWLEDGE_PASSAGES", "knowledge_passages", 5, _int(0, 50),
            "Passages of knowledge bases (the user's own and the personality's) retrieved for each question, best "
            "first, within LLM_RAG_LENGTH; 0 turns retrieval from knowledge bases off."),
    Setting("LLM_KNOWLEDGE_MAX_FILE_BYTES", "knowledge_max_file_bytes", 20_000_000, _int(1024),
            "Largest document one upload may add to a knowledge base."),
    Setting("LLM_KNOWLEDGE_QUOTA_BYTES", "knowledge_quota_bytes", 200_000_000, _int(0),
            "What one user's documents may weigh in all (0: no limit)."),
    Setting("LLM_SEARCH_URL", "search_url", None, _text,
            "A SearXNG instance (its JSON format enabled) for `|RAG|domain|/RAG|` questions and the model's own "
            "decision to search the web; without it such questions are answered without a search, with a note."),
    Setting("LLM_SEARCH_RESULTS", "search_results", 3, _int(1, 10),
            "Search results read (each page through the safe fetcher) for one question."),
    Setting("LLM_FETCH_TIMEOUT", "fetch_timeout", 10.0, _float(0.1),
            "Seconds to connect to, and between reads from, a fetched URL."),
    Setting("LLM_FETCH_MAX_BYTES", "fetch_max_bytes", 5_000_000, _int(1024),
            "Largest response body read from a fetched URL."),
    Setting("LLM_FETCH_MAX_REDIRECTS", "fetch_max_redirects", 5, _int(0),
            "Redirects followed by the URL fetcher (each one re-checked)."),
    Setting("LLM_FETCH_CACHE_SECONDS", "fetch_cache_seconds", 300, _int(0),
            "Seconds a fetched page stays cached so a conversation does not refetch it."),
    Setting("LLM_FETCH_ALLOW_DOMAINS", "fetch_allow_domains", (), _csv,
            "If set, only these domains (and their subdomains) may be fetched."),
    Setting("LLM_FETCH_DENY_DOMAINS", "fetch_deny_domains", (), _csv,
            "Domains (and their subdomains) that are never fetched."),
    Setting("LLM_UNSAFE_FETCH_ALLOW_LOOPBACK_FOR_TESTS", "unsafe_fetch_allow_loopback", False, _bool,
            "Tests only: lets the fetcher reach 127.0.0.0/8 and ::1. Never set this in production."),
    Setting("LLM_SECRET_KEY", "secret_key", None, _text,
            "Secret that signs each browser's anonymous identity cookie when there are no API keys. Default: a "
            "random one created once in LLM_DATA_DIR. Replicas sharing a database must share it."),
    Setting("LLM_API_KEYS", "api_keys", (), _csv,
            "Optional API keys (comma-separated, `key` or `user:key`). When set, every endpoint but /health, the "
            "pages and their static files needs one (`Authorization: Bearer`, `X-API-Key`, or the HttpOnly cookie "
            "the page gets from `POST /auth/session`); the key names the user. Never in a URL."),
    Setting("LLM_RATE_LIMIT", "rate_limit", None, _text,
            "Requests allowed per user (per address when anonymous) across every endpoint, websocket prompts "
            "included, e.g. `60/minute;1000/day`. Default: no limit."),
    Setting("LLM_AUTH_FAILURE_LIMIT", "auth_failure_limit", "10/minute", _text,
            "Failed authentications allowed per client address before it gets 429 (tried keys included)."),
    Setting("LLM_ALLOWED_HOSTS", "allowed_hosts", (), _csv,
            "Host names this service answers to (others get 400: DNS rebinding). Default: localhost, 127.0.0.1, "
            "::1 and HOST; with HOST=0.0.0.0 and none listed, any (a warning at start-up)."),
    Setting("LLM_CORS_ORIGINS", "cors_origins", (), _csv,
            "Origins allowed to call the service from a browser (CORS). Default: none (CORS off)."),
    Setting("LLM_MAX_BODY_BYTES", "max_body_bytes", 1_000_000, _int(1024),
            "Largest request body accepted (413 beyond)."),
    Setting("LLM_MAX_PROMPT_TOKENS", "max_prompt_tokens", 0, _int(0),
            "Largest single prompt in tokens (413 beyond); 0: only the context window limits it."),
    Setting("LLM_HTTP_THREADS", "http_threads", 128, _int(4, 4096),
            "Threads that run HTTP requests once their headers have arrived (idle and half-sent connections take "
            "none)."),
    Setting("LLM_HEADER_TIMEOUT", "header_timeout", 10.0, _float(0.5),
            "Seconds a connection may take to send a request's headers before it is closed (slowloris)."),
    Setting("LLM_MAX_CONNECTIONS_PER_ADDRESS", "max_connections_per_address", 256, _int(0),
            "Open connections allowed from one client address (0: no cap; trusted proxies are exempt)."),
    Setting("LLM_MAX_SOCKETS_PER_USER", "max_sockets_per_user", 32, _int(0),
            "Open websockets allowed per user (per address when anonymous); 0: no cap."),
    Setting("LLM_SOCKET_IDLE_TIMEOUT", "socket_idle_timeout", 900.0, _float(1.0),
            "Seconds a websocket may stay open without a prompt before the server closes it."),
    Setting("LLM_RESUME_SECONDS", "resume_seconds", 120.0, _float(0.0),
            "How long an answer goes on after its websocket (JSON mode) dropped, waiting for the client to "
            "reconnect and resume it, and how long a finished one is kept for that; 0: a dropped socket cancels "
            "its answer."),
    Setting("LLM_SOCKET_END_SESSION", "socket_end_session", False, _bool,
            "End each websocket answer with `<END session-id>` (the reference design's later clients, which open a "
            "socket per prompt and continue with `|SESSION|session-id|/SESSION|`) instead of `<END>`. "
            "`?end=session` or `?end=plain` chooses for one socket."),
    Setting("LLM_WS_PING_INTERVAL", "ws_ping_interval", 20.0, _float(1.0),
            "Seconds between websocket pings; a client that does not answer within as long again is dropped."),
    Setting("LLM_TRUSTED_PROXIES", "trusted_proxies", (), _csv,
            "Addresses of reverse proxies whose `X-Forwarded-User` header names the user."),
    Setting("DATABASE_URL", "database_url", None, _text,
            "Conversation store: `sqlite:///path` or `postgresql://user:pass@host/db` (shared by replicas). "
            "Default: SQLite in LLM_DATA_DIR."),
    Setting("LLM_DATA_DIR", "data_dir", os.path.join("~", ".local", "share", "llm-service"), _text,
            "Directory for the default SQLite conversation database."),
    Setting("LLM_MAX_CONVERSATIONS_PER_USER", "max_conversations_per_user", 10000, _int(0),
            "Conversations kept per user; beyond it new ones are refused (403) until old ones are deleted. 0: no cap."),
    Setting("LLM_RETENTION_DAYS", "retention_days", 0.0, _float(0.0),
            "Delete conversations not updated for this many days (0: keep forever)."),
    Setting("LLM_VERBOSE_ENGINE", "verbose_engine", False, _bool,
            "Log llama.cpp's own messages (model loading, offload, context sizes); by default only its warnings."),
    Setting("LLM_LOG_TRANSCRIPTS", "log_transcripts", False, _bool,
            "Log prompts and answers (they may hold personal information)."),
)

_BY_ATTR = {setting.attr: setting for setting in SETTINGS}
_BY_ENV = {setting.env: setting for setting in SETTINGS}


class Settings:
    """Parsed, validated settings; attribute names are the table's ``attr`` column."""

    def __init__(self, values: Mapping[str, Any]):
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes: Any) -> Settings:
        """A copy with some values changed (already parsed values)."""
        unknown = set(changes) - set(_BY_ATTR)
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        return Settings({**self._values, **changes})

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)


def _parse(setting: Setting, raw: Any) -> Any:
    if raw is None:
        return None
    if not isinstance(raw, str) and setting.parse not in (_csv,):
        # Values given programmatically (create_app config) are parsed from their text form.
        raw = str(raw)
    try:
        return setting.parse(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"Invalid value {raw!r} for {setting.env}: {exc}") from None


def load_settings(environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Defaults, then the environment, then ``overrides`` (keyed by environment variable name)."""
    environ = os.environ if environ is None else environ
    values = {setting.attr: setting.default for setting in SETTINGS}
    for setting in SETTINGS:
        if setting.env in environ:
            values[setting.attr] = _parse(setting, environ[setting.env])
    for key, raw in (overrides or {}).items():
        if key in _BY_ENV:
            setting = _BY_ENV[key]
            values[setting.attr] = raw if raw is None else _parse(setting, raw)
    if values["cpu_threads"] is None:
        values["cpu_threads"] = physical_cores()
    if values["cache_tokens"] is None:
        values["cache_tokens"] = values["context_window"] * values["parallel"]
    return Settings(values)


def settings_table_markdown() -> str:
    """The settings as a Markdown table, for the README."""
    rows = ["| Variable | Default | Kind | What it does |", "|---|---|---|---|"]
    for setting in SETTINGS:
        default = setting.default
        if isinstance(default, tuple):
            default = ",".join(default)
        shown = "(auto)" if default is None else f"`{default}`" if default != "" else "(empty)"
        kind = getattr(setting.parse, "kind", "text")
        rows.append(f"| `{setting.env}` | {shown} | {kind} | {setting.help} |")
    return "\n".join(rows)


def settings_help_text() -> str:
    """The settings as plain text, for ``python app.py --help``."""
    lines = ["Settings (environment variables):", ""]
    for setting in SETTINGS:
        lines.append(f"  {setting.env}  (default: {setting.default!r})")
        lines.append(f"      {setting.help}")
    return "\n".join(lines)


__all__ = ["SETTINGS", "Settings", "Setting", "load_settings", "settings_table_markdown", "settings_help_text",
           "physical_cores"]
