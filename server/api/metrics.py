"""Prometheus metrics with TGI's names, in the text exposition format.

Written out by hand rather than through prometheus_client, because TGI's counters are named
without the `_total` suffix that the client library appends, and dashboards built for TGI
query the bare names (`tgi_request_count`, `tgi_request_success`, ...).
"""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
TOKEN_HISTOGRAMS = {"tgi_request_input_length", "tgi_request_generated_tokens", "tgi_request_max_new_tokens"}

Labels = tuple[tuple[str, str], ...]


def _render_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = labels + extra
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: Labels) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else _number(bound)
            out.append(f"{name}_bucket{_render_labels(labels, (('le', le),))} {running}")
        out.append(f"{name}_sum{_render_labels(labels)} {_number(self.sum)}")
        out.append(f"{name}_count{_render_labels(labels)} {running}")
        return out


class Metrics:
    """Counters, gauges and histograms keyed by name and labels; safe to use from any thread."""

    HELP = {
        "tgi_request_count": ("counter", "Requests received"),
        "tgi_request_success": ("counter", "Requests answered successfully"),
        "tgi_request_failure": ("counter", "Requests that failed, by cause"),
        "tgi_request_adapter_count": ("counter", "Requests answered through each LoRA adapter"),
        "tgi_request_duration": ("histogram", "End-to-end request latency (s)"),
        "tgi_request_validation_duration": ("histogram", "Time spent validating a request (s)"),
        "tgi_request_queue_duration": ("histogram", "Time from arrival to first scheduling (s)"),
        "tgi_request_inference_duration": ("histogram", "Time from first scheduling to the end (s)"),
        "tgi_request_mean_time_per_token_duration": ("histogram", "Mean time between output tokens (s)"),
        "tgi_request_input_length": ("histogram", "Input tokens per request"),
        "tgi_request_generated_tokens": ("histogram", "Generated tokens per request"),
        "tgi_request_max_new_tokens": ("histogram", "max_new_tokens per request"),
        "tgi_queue_size": ("gauge", "Sequences waiting to be scheduled"),
        "tgi_batch_current_size": ("gauge", "Sequences in the running batch"),
        "tgi_batch_current_max_tokens": ("gauge", "KV cache tokens in use"),
        "tgi_batch_max_total_tokens": ("gauge", "KV cache capacity in tokens"),
        # Not TGI's (its KV cache is not paged in blocks it reports); what a leak check counts.
        "tgi_kv_cache_blocks_in_use": ("gauge", "KV cache blocks held by sequences"),
        "tgi_kv_cache_blocks_total": ("gauge", "KV cache blocks in all"),
    }

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._gauges: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._histograms: dict[str, dict[Labels, Histogram]] = defaultdict(dict)

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets = TOKEN_BUCKETS if name in TOKEN_HISTOGRAMS else DURATION_BUCKETS
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._histograms[name]
            if key not in series:
                series[key] = Histogram(buckets)
            series[key].observe(value)

    def render(self) -> str:
        lines = []
        with self._lock:
            for kind, table in (("counter", self._counters), ("gauge", self._gauges),
                                ("histogram", self._histograms)):
                for name in sorted(table):
                    help_text = self.HELP.get(name, (kind, name))[1]
                    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
                    for labels, value in sorted(table[name].items()):
                        if kind == "histogram":
                            lines += value.lines(name, labels)
                        else:
                            lines.append(f"{name}{_render_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"
