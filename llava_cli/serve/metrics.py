"""`llava serve`'s Prometheus metrics (`GET /metrics`), through the maintained `prometheus_client`.

Contract: `Metrics()` owns one registry (never the global one: two servers in one process stay
apart). The server reports into it:

- `request(endpoint, status, seconds)`: every HTTP request, by endpoint and status, and its time;
- `answered(stats)`: an answer's prompt, cached and generated tokens, time to first token and
  time per output token (from its `Stats`);
- `loaded()` / `unloaded()`: model load and unload events (`--keep-alive`);
- `watch({name: (help, read)})`: gauges read when scraped (serve/app.py: queue depth, running rows,
  the batch size, whether the model is loaded, the KV-cache bytes held against `--cache-mb`).

`render() -> (bytes, content type)` is the text exposition. prometheus_client is imported here
only, when a server starts (`llava --help` stays instant).
"""

from __future__ import annotations

from collections.abc import Callable

from llava_cli.engine.streaming import Stats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "llava_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "llava_request_seconds",
            "Time from a request's headers to the end of its response",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter("llava_prompt_tokens", "Prompt tokens of the answers given", registry=registry)
        self.cached_tokens = Counter(
            "llava_cached_tokens", "Prompt tokens taken from the prefix cache", registry=registry
        )
        self.generated_tokens = Counter("llava_generated_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram(
            "llava_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.tpot = Histogram(
            "llava_time_per_output_token_seconds",
            "Time per output token after the first",
            buckets=TOKEN_TIME_BUCKETS,
            registry=registry,
        )
        self.loads = Counter("llava_model_loads", "Times the model was loaded", registry=registry)
        self.unloads = Counter(
            "llava_model_unloads", "Times the model was unloaded after --keep-alive idle time", registry=registry
        )
        self.gauge = lambda name, text: Gauge(name, text, registry=registry)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def answered(self, stats: Stats) -> None:
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_tokens.inc(stats.cached_tokens)
        self.generated_tokens.inc(stats.completion_tokens)
        self.ttft.observe(stats.ttft_s)
        if stats.completion_tokens > 1:
            self.tpot.observe((stats.seconds - stats.ttft_s) / (stats.completion_tokens - 1))

    def loaded(self) -> None:
        self.loads.inc()

    def unloaded(self) -> None:
        self.unloads.inc()

    def watch(self, readings: dict[str, tuple[str, Callable[[], float]]]) -> None:
        """Gauges read at each scrape: name -> (help, a function giving the value)."""
        for name, (text, read) in readings.items():
            self.gauge(name, text).set_function(read)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
