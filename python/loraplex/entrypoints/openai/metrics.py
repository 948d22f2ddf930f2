"""Prometheus metrics (prometheus_client), per adapter where it makes sense. The ``adapter``
label is the name a request's ``model`` used: an adapter's, or the served base name."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from loraplex._core import LoRARequest
from loraplex.outputs import RequestOutput

if TYPE_CHECKING:
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.entrypoints.openai.api_server import Server

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    """Read at scrape time from the server's ``engine_metrics()``."""

    def __init__(self, server: Server):
        self.server = server

    def collect(self):
        yield from self.server.engine_metrics()


def engine_snapshot(engine: LLMEngine, loras: dict[str, int]) -> dict[str, Any]:
    """An engine's queue sizes, KV blocks and where each named adapter (name -> id) is:
    what ``/metrics`` shows, and what a replica reports to the cluster (plain data)."""
    core = engine.scheduler
    adapters = []
    for name, lora_id in loras.items():
        where = core.adapter_residency(lora_id)
        if where is None:
            continue
        on_device, in_host, pinned = where
        tiers = [t for t, present in (("device", on_device), ("host", in_host)) if present]
        if tiers:
            adapters.append(dict(name=name, tiers=tiers, pinned=bool(pinned)))
    return dict(
        running=core.num_running,
        waiting=core.num_waiting,
        kv_free_blocks=core.num_free_blocks,
        kv_total_blocks=engine.num_kv_blocks,
        adapters=adapters,
    )


def snapshot_metrics(snapshots: dict[str | None, dict[str, Any]]):
    """Gauges from engine snapshots, keyed by replica id (labelled ``replica``), or by None
    for the one engine of a single-process server (no label)."""
    by_replica = any(key is not None for key in snapshots)
    extra = ["replica"] if by_replica else []
    gauges = [
        ("running", "loraplex:num_requests_running", "Requests running (in the batch)."),
        ("waiting", "loraplex:num_requests_waiting", "Requests waiting to be scheduled."),
        ("kv_free_blocks", "loraplex:kv_cache_free_blocks", "Free KV cache blocks."),
        ("kv_total_blocks", "loraplex:kv_cache_total_blocks", "KV cache blocks."),
    ]
    for key, name, doc in gauges:
        family = GaugeMetricFamily(name, doc, labels=extra)
        for replica, snap in snapshots.items():
            family.add_metric([replica] if by_replica else [], float(snap[key]))
        yield family
    loaded = GaugeMetricFamily(
        "loraplex:lora_adapter_loaded",
        "1 where an adapter's weights are: a device slot or the host tier.",
        labels=["adapter", "tier", "pinned", *extra],
    )
    for replica, snap in snapshots.items():
        for a in snap["adapters"]:
            for tier in a["tiers"]:
                labels = [a["name"], tier, str(a["pinned"]).lower()]
                loaded.add_metric(labels + ([replica] if by_replica else []), 1.0)
    yield loaded


class Metrics:
    def __init__(self, server: Server):
        self.server = server
        self.registry = r = CollectorRegistry()
        r.register(_EngineCollector(server))
        self.loads = Counter(
            "loraplex:lora_adapter_loads",
            "Adapter loads by source.",
            ["adapter", "source"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "loraplex:lora_adapter_load_seconds",
            "Seconds to read and validate an adapter.",
            buckets=_LATENCY,
            registry=r,
        )
        self.success = Counter(
            "loraplex:request_success",
            "Finished requests.",
            ["adapter", "finish_reason"],
            registry=r,
        )
        self.by_replica = Counter(
            "loraplex:replica_requests",
            "Requests ended, by the replica that served them (a server over replicas).",
            ["replica", "adapter"],
            registry=r,
        )
        self.replica_tokens = Counter(
            "loraplex:replica_generation_tokens",
            "Generated tokens, by the replica that made them (a server over replicas).",
            ["replica", "adapter"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "loraplex:prompt_tokens", "Prompt tokens.", ["adapter"], registry=r
        )
        self.generation_tokens = Counter(
            "loraplex:generation_tokens", "Generated tokens.", ["adapter"], registry=r
        )
        self.ttft = Histogram(
            "loraplex:time_to_first_token_seconds",
            "Time to first token.",
            ["adapter"],
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "loraplex:inter_token_latency_seconds",
            "Time between streamed tokens.",
            ["adapter"],
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "loraplex:e2e_request_latency_seconds",
            "Arrival to last token.",
            ["adapter"],
            buckets=_LATENCY,
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def loaded(self, name: str, source: str, seconds: float) -> None:
        self.loads.labels(name, source).inc()
        self.load_seconds.observe(seconds)

    def request(self, lora: LoRARequest | None) -> RequestTracker:
        return RequestTracker(self, lora.lora_name if lora else self.server.base)


class RequestTracker:
    """One request's token counts, from its outputs, and its latencies, from the engine's
    timings on its last output (the same for streamed and whole responses)."""

    def __init__(self, metrics: Metrics, adapter: str):
        self.m, self.adapter = metrics, adapter
        self.prompt_counted = False
        self.generated = 0
        self.finish: dict[int, Any] = {}

    def observe(self, out: RequestOutput) -> None:
        if not self.prompt_counted:
            self.prompt_counted = True
            self.m.prompt_tokens.labels(self.adapter).inc(len(out.prompt_token_ids))
        new = sum(len(c.token_ids) for c in out.outputs)
        self.generated += new
        self.m.generation_tokens.labels(self.adapter).inc(new)
        for c in out.outputs:
            if c.finish_reason is not None:
                self.finish[c.index] = c.finish_reason
        t = out.metrics
        if out.finished and t is not None:
            a = self.adapter
            if t.first_token_time is not None:
                self.m.ttft.labels(a).observe(max(0.0, t.first_token_time - t.arrival_time))
                if self.generated > 1:
                    gap = (t.last_token_time - t.first_token_time) / (self.generated - 1)
                    self.m.itl.labels(a).observe(max(0.0, gap))
            end = t.finished_time or t.last_token_time
            self.m.e2e.labels(a).observe(max(0.0, end - t.arrival_time))

    def done(self, replica: str | None = None) -> None:
        """The request ended; ``replica`` served it (None on a single server)."""
        for reason in self.finish.values():
            self.m.success.labels(self.adapter, str(reason)).inc()
        if replica is not None:
            self.m.by_replica.labels(replica, self.adapter).inc()
            self.m.replica_tokens.labels(replica, self.adapter).inc(self.generated)
