"""Prometheus metrics of the gateway, on a registry of its own (one per app instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120)
OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "gateway_requests", "Requests answered, by model, key name and HTTP status",
            ["model", "key", "status"], registry=r)
        self.duration = Histogram(
            "gateway_request_duration_seconds", "Whole request time, to the last byte",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram(
            "gateway_time_to_first_byte_seconds",
            "Time to the first body byte from the backend (first token for streams)",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram(
            "gateway_overhead_seconds", "Time the gateway itself added (backend waits excluded)",
            ["model"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.tokens = Counter(
            "gateway_tokens", "Tokens, by model, key name and kind (prompt or completion)",
            ["model", "key", "kind"], registry=r)
        self.in_flight = Gauge(
            "gateway_in_flight_requests", "Requests being served, by model", ["model"],
            registry=r)
        self.limited = Counter(
            "gateway_rate_limited", "Requests refused by a per-key limit",
            ["key", "limit"], registry=r)
        self.backend_errors = Counter(
            "gateway_backend_errors", "Backend failures by model and kind",
            ["model", "kind"], registry=r)
        self.backend_up = Gauge(
            "gateway_backend_up", "1 when the model's backend answered its last health check",
            ["model"], registry=r)
        self.limiter_errors = Counter(
            "gateway_ratelimit_store_errors", "Calls to the shared rate-limit store that failed",
            registry=r)
        self.keys_reload_failures = Counter(
            "gateway_keys_reload_failures",
            "Changed keys files refused at reload (the last good set stayed in force)",
            registry=r)
        self.keys_last_reload_ok = Gauge(
            "gateway_keys_last_reload_ok",
            "1 when the keys file in force is the one on disk; 0 after a refused reload",
            registry=r)
        self.keys_last_reload_ok.set(1)  # the process does not start with a bad file
        self._children: dict[tuple, object] = {}

    def of(self, metric, *labels: str):
        """`metric.labels(*labels)`, remembered: the library checks and converts the labels on
        every call, several times per request on the hot path."""
        try:
            return self._children[(metric, labels)]
        except KeyError:
            child = self._children[(metric, labels)] = metric.labels(*labels)
            return child

    def track_key_store(self) -> None:
        """The shared key store's metrics; only a gateway that reads one (keys_s3) has them,
        so an alert on their age never fires for a gateway with a keys file."""
        self.keys_store_errors = Counter(
            "gateway_keys_store_errors",
            "Reads of the shared keys object (S3) that failed; the last good set stayed in force",
            registry=self.registry)
        self.keys_store_synced = Gauge(
            "gateway_keys_store_last_sync_timestamp_seconds",
            "When the shared keys object (S3) last answered (Unix time; 0: not since start)",
            registry=self.registry)

    def keys_reloaded(self, ok: bool) -> None:
        self.keys_last_reload_ok.set(1 if ok else 0)
        if not ok:
            self.keys_reload_failures.inc()
