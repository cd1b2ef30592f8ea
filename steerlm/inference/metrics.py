"""The serving engine's Prometheus metrics (`GET /metrics`, text exposition format 0.0.4).

A server that several teams share runs behind a load balancer and an autoscaler, which read its queue, its
latencies and each team's tokens. vLLM and TGI expose theirs at `/metrics` in this format, so an existing
Prometheus scrape job and Grafana panels carry over. The engine thread counts as it admits, steps and ends jobs,
and the handler renders a snapshot. steerlm writes the format itself: counters, gauges, and histograms with
cumulative `le` buckets. Request metrics carry the route and the profile (the team's preset), so a team's usage
is one label away.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: from a cached short answer on a GPU to a long generation queued behind others on a CPU
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)


class Outcome(str, Enum):
    """How a request left the engine."""

    completed = "completed"  # every row finished (or the scores were delivered)
    cancelled = "cancelled"  # its client went away
    timeout = "timeout"  # past limits.request_timeout_s, queued or decoding
    failed = "failed"  # a step or a row failed, the scorer raised, or the server shut down first


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter, gauge or histogram
    help: str
    labels: tuple[str, ...] = ()


REQUEST = ("route", "profile")
ADMITTED = Metric(
    "steerlm_requests_admitted_total", "counter", "Requests that joined the batch or were scored.", REQUEST
)
ROWS = Metric("steerlm_rows_admitted_total", "counter", "Generated sequences admitted (a request's n).", REQUEST)
PROMPT_TOKENS = Metric(
    "steerlm_prompt_tokens_total", "counter", "Prompt tokens of admitted rows (n rows: the prompt n times).", REQUEST
)
GENERATED = Metric("steerlm_generation_tokens_total", "counter", "Tokens generated (stop tokens excluded).", REQUEST)
FINISHED_ROWS = Metric(
    "steerlm_rows_finished_total", "counter", "Rows that finished, by finish reason.", (*REQUEST, "finish_reason")
)
ENDED = Metric(
    "steerlm_requests_ended_total", "counter", "Requests that left the engine, by outcome.", (*REQUEST, "outcome")
)
REJECTED = Metric(
    "steerlm_requests_rejected_total",
    "counter",
    "Requests refused at submission (queue_full: HTTP 429; shutting_down: HTTP 503).",
    ("reason",),
)
STEPS = Metric("steerlm_decode_steps_total", "counter", "Decoding steps of the batch.")
QUEUE_WAIT = Metric("steerlm_queue_wait_seconds", "histogram", "Submission to joining the batch or scoring.", REQUEST)
FIRST_TOKEN = Metric("steerlm_time_to_first_token_seconds", "histogram", "Submission to the first delta.", REQUEST)
LATENCY = Metric("steerlm_request_latency_seconds", "histogram", "Submission to completion.", REQUEST)
WAITING = Metric("steerlm_requests_waiting", "gauge", "Requests queued for the batch.")
RUNNING = Metric("steerlm_rows_running", "gauge", "Rows decoding now.")
HEALTHY = Metric("steerlm_healthy", "gauge", "1 while the engine takes requests, 0 once it stops.")
METRICS = (ADMITTED, ROWS, PROMPT_TOKENS, GENERATED, FINISHED_ROWS, ENDED, REJECTED, STEPS)
HISTOGRAMS = (QUEUE_WAIT, FIRST_TOKEN, LATENCY)
GAUGES = (WAITING, RUNNING, HEALTHY)


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))  # the last: above all
    total: float = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(LATENCY_BUCKETS) if value <= bound), len(LATENCY_BUCKETS))
        self.counts[index] += 1
        self.total += value


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)] + ([extra] if extra else [])
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class EngineMetrics:
    """Counters and histograms the engine thread updates; `render` (any thread) takes a consistent snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[tuple[str, ...], float]] = defaultdict(lambda: defaultdict(float))
        self._histograms: dict[str, dict[tuple[str, ...], _Histogram]] = defaultdict(lambda: defaultdict(_Histogram))

    def count(self, metric: Metric, labels: tuple[str, ...] = (), value: float = 1) -> None:
        assert metric.kind == "counter" and len(labels) == len(metric.labels), metric.name
        with self._lock:
            self._counts[metric.name][labels] += value

    def observe(self, metric: Metric, labels: tuple[str, ...], seconds: float) -> None:
        assert metric.kind == "histogram" and len(labels) == len(metric.labels), metric.name
        with self._lock:
            self._histograms[metric.name][labels].observe(seconds)

    def render(self, gauges: Mapping[Metric, float]) -> str:
        """The exposition text: every metric's HELP and TYPE, then its samples (none yet: none)."""
        lines: list[str] = []
        with self._lock:
            for metric in METRICS:
                lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} counter"]
                for labels, value in sorted(self._counts[metric.name].items()):
                    lines.append(f"{metric.name}{_labels(metric.labels, labels)} {_number(value)}")
            for metric in HISTOGRAMS:
                lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} histogram"]
                for labels, histogram in sorted(self._histograms[metric.name].items()):
                    cumulative = 0
                    for bound, count in zip((*LATENCY_BUCKETS, math.inf), histogram.counts):
                        cumulative += count
                        le = _labels(metric.labels, labels, f'le="{_number(bound)}"')
                        lines.append(f"{metric.name}_bucket{le} {cumulative}")
                    name = _labels(metric.labels, labels)
                    lines.append(f"{metric.name}_sum{name} {_number(histogram.total)}")
                    lines.append(f"{metric.name}_count{name} {cumulative}")
        for metric, value in gauges.items():
            lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} gauge"]
            lines.append(f"{metric.name} {_number(value)}")
        return "\n".join(lines) + "\n"
