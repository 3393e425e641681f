"""Prometheus metrics for one app: ``GET /metrics`` renders ``Metrics.registry``.

Each app owns a ``CollectorRegistry`` (tests build many apps in one process, so nothing lives in
prometheus_client's global registry). Counters and histograms move when requests and answers end; the
engine's figures (queue, active sequences, cache, evictions) are read from ``engine.stats()`` at scrape time
by ``EngineCollector``, so they are always current and cost nothing between scrapes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
TPS_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 200, 500, 1000)
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OUTCOME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# engine.stats() per-model keys: (metric suffix, help, is a counter)
ENGINE_FIGURES = (
    ("queue_depth", "Requests waiting for a free sequence.", False),
    ("active_sequences", "Sequences being prefilled or decoded.", False),
    ("cached_conversations", "Idle conversations whose tokens are still in the KV cache.", False),
    ("suspended_conversations", "Evicted conversations whose saved state is kept in memory.", False),
    ("cache_tokens_used", "KV cache cells in use.", False),
    ("cache_tokens", "KV cache size in tokens.", False),
    ("last_step_age", "Seconds since the scheduler's last step.", False),
    ("cache_hit_tokens", "Prompt tokens served from the KV cache instead of being prefilled.", True),
    ("prompt_tokens", "Prompt tokens submitted to the model (cached or not).", True),
    ("evictions", "Idle conversations evicted from the KV cache to make room.", True),
    ("suspends", "Evicted conversations whose state was saved for a later restore.", True),
    ("restores", "Conversations restored from saved state instead of recomputed.", True),
    ("steps", "Scheduler steps (one llama_decode each).", True),
    ("drafted_tokens", "Speculative draft tokens checked (prompt lookup).", True),
    ("accepted_draft_tokens", "Speculative draft tokens kept: each one a decode step saved.", True),
    ("moves", "Streams exchanged to keep busy sequence ids consecutive (one decode pass per run of ids).", True),
    ("step_fixed_seconds", "What a decode step costs whatever it carries, fitted to recent steps (pacing).", False),
    ("step_token_seconds", "What each token adds to a decode step, fitted to recent steps (pacing).", False),
)


class EngineCollector(Collector):
    """Reads ``engine.stats()`` at scrape time: one sample per loaded model for each figure."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.stats = stats

    def describe(self) -> list[Metric]:
        return []  # figures depend on which models are loaded; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.stats() or {}
        except Exception:  # a scrape must not fail because the engine is busy closing or broken
            log.exception("engine.stats() failed during a metrics scrape")
            stats = {}
        models = stats.get("models") or {}
        for key, text, counter in ENGINE_FIGURES:
            family = (CounterMetricFamily if counter else GaugeMetricFamily)(f"llm_engine_{key}", text,
                                                                               labels=["model"])
            for name, figures in sorted(models.items()):
                value = figures.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    family.add_metric([str(name)], value)
            yield family
        loading = GaugeMetricFamily("llm_models_loading", "Models being loaded.")
        loading.add_metric([], len(stats.get("loading") or ()))
        yield loading
        errors = GaugeMetricFamily("llm_model_load_errors", "Models that failed to load.")
        errors.add_metric([], len(stats.get("load_errors") or {}))
        yield errors
        yield from _upstream_metrics(stats.get("upstreams") or {})


# A remote engine's per-upstream figures (llm.engine.remote): (key, metric, help, is a counter)
UPSTREAM_FIGURES = (
    ("healthy", "llm_upstream_healthy", "1 while the upstream answers, 0 while it is marked down.", False),
    ("in_flight", "llm_upstream_in_flight", "Requests the upstream is answering now.", False),
    ("answered", "llm_upstream_answered", "Answers the upstream finished.", True),
    ("failures", "llm_upstream_failures", "Times the upstream failed (and was marked down).", True),
)


def _upstream_metrics(upstreams: dict[str, dict[str, Any]]) -> Iterator[Metric]:
    for key, name, text, counter in UPSTREAM_FIGURES:
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, text, labels=["upstream"])
        for upstream, figures in sorted(upstreams.items()):
            family.add_metric([upstream], float(figures.get(key, 0)))
        yield family


class Metrics:
    """The service's metrics in a registry of their own."""

    def __init__(self, engine_stats: Callable[[], dict[str, Any]], process: bool = True):
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter("llm_requests", "Requests answered (HTTP requests; websocket answers one by one).",
                                ["channel", "endpoint", "personality", "status"], registry=registry)
        self.request_seconds = Histogram("llm_request_duration_seconds",
                                         "HTTP time to response headers (streams continue after).",
                                         ["endpoint"], buckets=DURATION_BUCKETS, registry=registry)
        self.answers = Counter("llm_answers", "Generated answers by how they ended.",
                               ["personality", "channel", "finish_reason"], registry=registry)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens of finished answers (tokens in).",
                                     ["personality"], registry=registry)
        self.cached_tokens = Counter("llm_cached_prompt_tokens", "Prompt tokens reused from the cache.",
                                     ["personality"], registry=registry)
        self.completion_tokens = Counter("llm_completion_tokens", "Generated tokens (tokens out).",
                                         ["personality"], registry=registry)
        self.ttft = Histogram("llm_time_to_first_token_seconds", "Time from submission to the first token.",
                              ["personality"], buckets=TTFT_BUCKETS, registry=registry)
        self.tps = Histogram("llm_tokens_per_second", "Decode speed of one answer (tokens per second).",
                             ["personality"], buckets=TPS_BUCKETS, registry=registry)
        self.fetches = Counter("llm_fetches", "RAG page and feed fetches by outcome.", ["outcome"],
                               registry=registry)
        self.schema_answers = Counter("llm_schema_answers", "Schema-constrained answers (/toil, /v1 json_schema) by "
                                      "outcome: valid at once, valid after resampling, or no valid answer.",
                                      ["outcome"], registry=self.registry)
        self.feedback = Counter("llm_feedback", "Thumbs up or down on answers.", ["personality", "rating"],
                                registry=registry)
        registry.register(EngineCollector(engine_stats))
        if process:
            ProcessCollector(registry=registry)  # resident memory, CPU time, open files of this process

    def fetch_outcome(self, outcome: str) -> None:
        """Count one fetch: ok, refused, failed, cached, ... (other spellings are counted as 'other')."""
        self.fetches.labels(outcome if isinstance(outcome, str) and OUTCOME.match(outcome) else "other").inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
