"""Prometheus metrics of the server (``GET /metrics``), one registry per server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..llm.requests import GenerationResult
from ..llm.stats import EngineStats

__all__ = ["EngineFigures", "ServerMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineFigures(Protocol):
    """What the metrics read at scrape time from whatever runs the engine loop.

    A protocol rather than the service class, so the service depends on its metrics and
    never the other way round; each figure is read on the scraping thread.
    """

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        ...

    @property
    def running(self) -> int:
        """Requests decoding now."""
        ...

    @property
    def stats(self) -> EngineStats:
        """The engine's running totals (steps, seconds, tokens, bytes copied)."""
        ...


class ServerMetrics:
    """Request, token, queue and controller figures, rendered in Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "wasmshare_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.tokens = Counter("wasmshare_generated_tokens", "Tokens generated and delivered", registry=r)
        self.prompt_tokens = Counter("wasmshare_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.sequences = Counter(
            "wasmshare_sequences", "Sequences finished, by reason", ["reason"], registry=r
        )
        self.controller_faults = Counter(
            "wasmshare_controller_faults", "Sequences ended by a controller or constraint failure", registry=r
        )
        self.cancelled = Counter("wasmshare_cancelled", "Requests whose client went away", registry=r)
        self.time_to_first_token = Histogram(
            "wasmshare_time_to_first_token_seconds",
            "From submission to the first token",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self._collector = _EngineCollector()
        r.register(self._collector)

    def watch(self, source: EngineFigures) -> None:
        """Report the queue and engine figures of ``source`` at every scrape."""
        self._collector.source = source

    def finished(self, result: GenerationResult) -> None:
        """Count a finished sequence."""
        self.sequences.labels(result.finish_reason).inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        if result.finish_reason == "error":
            self.controller_faults.inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and counters read from the watched engine at scrape time (none before ``watch``)."""

    def __init__(self) -> None:
        self.source: EngineFigures | None = None

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Metric]:
        source = self.source
        if source is None:
            return
        stats = source.stats
        yield GaugeMetricFamily("wasmshare_queue_depth", "Requests waiting for a slot", value=source.waiting)
        yield GaugeMetricFamily("wasmshare_running_sequences", "Requests decoding now", value=source.running)
        yield CounterMetricFamily("wasmshare_engine_steps", "Decode steps", value=stats.steps)
        yield CounterMetricFamily(
            "wasmshare_controller_seconds",
            "Controller and mask work (all of it, overlapped or not)",
            value=stats.controller_s,
        )
        yield CounterMetricFamily(
            "wasmshare_controller_critical_seconds",
            "Controller and mask work left on the critical path",
            value=stats.critical_controller_s + stats.apply_s,
        )
        yield CounterMetricFamily("wasmshare_forward_seconds", "Model forward passes", value=stats.forward_s)
        yield CounterMetricFamily(
            "wasmshare_fast_forward_tokens",
            "Tokens spliced in by fast-forward",
            value=stats.fast_forward_tokens,
        )
        yield CounterMetricFamily(
            "wasmshare_bytes_copied", "Bytes copied between host and controllers", value=stats.bytes_copied
        )
        yield CounterMetricFamily(
            "wasmshare_sat_out_steps",
            "Row-steps the batch took without a row whose controller was late",
            value=stats.sat_out_steps,
        )
        yield CounterMetricFamily(
            "wasmshare_late_answers", "Controller answers taken up after their step", value=stats.late_answers
        )
        yield GaugeMetricFamily(
            "wasmshare_max_lag_steps", "Most steps in a row one sequence sat out", value=stats.max_lag_steps
        )
