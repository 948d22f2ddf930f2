"""Prometheus metrics (prometheus_client): vLLM's series by vLLM's names and labels
(``model_name`` is the served base name, ``engine`` the engine or replica), so a vLLM
dashboard reads them; beside them loraplex's own, per adapter (``adapter`` is the name a
request's ``model`` used), per tenant and per replica. Engine gauges are read from the
engine client's snapshot at scrape time (``engine_metrics``); request series are fed by each
request's outputs. An adapter's own series are removed when it is unloaded."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from loraplex.engine.stats import MAX_TENANT_SERIES
from loraplex.entrypoints.openai.engine_metrics import engine_families
from loraplex.outputs import RequestOutput

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# vLLM's buckets, so its dashboards' quantiles read the same
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
_TTFT = _TTFT + (7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5)
_ITL = _ITL + (10.0, 20.0, 40.0, 80.0)
_REQUEST = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0)
_REQUEST = _REQUEST + (60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


#: The label of tenants past the first ``MAX_TENANT_SERIES`` in per-tenant histograms.
OTHER_TENANTS = "(other)"


def _buckets_1_2_5(limit: int) -> list[int]:
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(m * scale)
        scale *= 10


class _SnapshotCollector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        yield from engine_families(self.metrics.model_name, self.metrics.stats)


class Metrics:
    """The server's registry. ``await refresh(client)`` before ``render()`` reads the
    engines' snapshot; ``request(adapter_name)`` tracks one request."""

    def __init__(self, model_name: str, max_model_len: int):
        self.model_name = model_name
        self.stats: dict[str | None, dict[str, Any]] = {}
        self.total_prompt = self.total_generated = 0  # for the periodic stats line
        self.registry = r = CollectorRegistry()
        r.register(_SnapshotCollector(self))
        self._adapter_labels: dict[str, set[tuple[Any, tuple[str, ...]]]] = defaultdict(set)
        v = ["model_name", "engine"]
        lengths = _buckets_1_2_5(max_model_len)
        self.v_prompt = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", v, registry=r
        )
        self.v_generation = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", v, registry=r
        )
        self.v_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*v, "finished_reason"],
            registry=r,
        )
        hist = [
            ("ttft", "vllm:time_to_first_token_seconds", "Time to first token in seconds.", _TTFT),
            ("itl", "vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", _ITL),
            (
                "tpot",
                "vllm:request_time_per_output_token_seconds",
                "Time per output token of a request in seconds.",
                _ITL,
            ),
            (
                "e2e",
                "vllm:e2e_request_latency_seconds",
                "E2e request latency in seconds.",
                _REQUEST,
            ),
            ("queue", "vllm:request_queue_time_seconds", "Time spent WAITING.", _REQUEST),
            ("inference", "vllm:request_inference_time_seconds", "Time spent RUNNING.", _REQUEST),
            ("prefill", "vllm:request_prefill_time_seconds", "Time spent in PREFILL.", _REQUEST),
            ("decode", "vllm:request_decode_time_seconds", "Time spent in DECODE.", _REQUEST),
            ("prompt_len", "vllm:request_prompt_tokens", "Prefill tokens of a request.", lengths),
            (
                "gen_len",
                "vllm:request_generation_tokens",
                "Generated tokens of a request.",
                lengths,
            ),
            ("max_tokens", "vllm:request_params_max_tokens", "The max_tokens parameter.", lengths),
            ("n", "vllm:request_params_n", "The n request parameter.", [1, 2, 5, 10, 20]),
        ]
        self.v_hist = {
            key: Histogram(name, doc, v, buckets=buckets, registry=r)
            for key, name, doc, buckets in hist
        }
        a = ["adapter"]
        self.loads = Counter(
            "loraplex:lora_adapter_loads", "Adapter loads by source.", [*a, "source"], registry=r
        )
        self.load_seconds = Histogram(
            "loraplex:lora_adapter_load_seconds",
            "Seconds to read and validate an adapter.",
            buckets=_LATENCY,
            registry=r,
        )
        self.success = Counter(
            "loraplex:request_success", "Finished requests.", [*a, "finish_reason"], registry=r
        )
        self.by_replica = Counter(
            "loraplex:replica_requests",
            "Requests ended, by the replica that served them (a server over replicas).",
            ["replica", *a],
            registry=r,
        )
        self.replica_tokens = Counter(
            "loraplex:replica_generation_tokens",
            "Generated tokens, by the replica that made them (a server over replicas).",
            ["replica", *a],
            registry=r,
        )
        self.prompt_tokens = Counter("loraplex:prompt_tokens", "Prompt tokens.", a, registry=r)
        self.generation_tokens = Counter(
            "loraplex:generation_tokens", "Generated tokens.", a, registry=r
        )
        self.queue = Histogram(
            "loraplex:request_queue_time_seconds",
            "Time spent waiting to be scheduled, per adapter (vLLM's, split by client).",
            a,
            buckets=_LATENCY,
            registry=r,
        )
        self.tenant_queue = Histogram(
            "loraplex:tenant_request_queue_time_seconds",
            "Time spent waiting to be scheduled, per tenant (a request's `user` under "
            f"scheduling_policy=fair; the first {MAX_TENANT_SERIES} seen, the rest as "
            f"'{OTHER_TENANTS}').",
            ["tenant"],
            buckets=_LATENCY,
            registry=r,
        )
        self._tenants: set[str] = set()
        self.ttft = Histogram(
            "loraplex:time_to_first_token_seconds",
            "Time to first token.",
            a,
            buckets=_LATENCY,
            registry=r,
        )
        self.itl = Histogram(
            "loraplex:inter_token_latency_seconds",
            "Time between generated tokens.",
            a,
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "loraplex:e2e_request_latency_seconds",
            "Arrival to last token.",
            a,
            buckets=_LATENCY,
            registry=r,
        )

    async def refresh(self, client) -> None:
        self.stats = await client.stats()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def labels(self, adapter: str, metric, *values: str):
        """``metric.labels(*values)``, remembered under ``adapter`` so that unloading the
        adapter removes the series."""
        self._adapter_labels[adapter].add((metric, values))
        return metric.labels(*values)

    def loaded(self, name: str, source: str, seconds: float) -> None:
        self.labels(name, self.loads, name, source).inc()
        self.load_seconds.observe(seconds)

    def forget_adapter(self, name: str) -> None:
        """Removes every series labelled with adapter ``name`` (it was unloaded)."""
        for metric, values in self._adapter_labels.pop(name, set()):
            try:
                metric.remove(*values)
            except KeyError:
                pass

    def request(self, adapter: str, tenant: str | None = None) -> RequestTracker:
        return RequestTracker(self, adapter, tenant)

    def tenant_label(self, tenant: str) -> str:
        """``tenant`` as a label value: the first ``MAX_TENANT_SERIES`` tenants seen keep
        their own series, later ones share one."""
        if tenant not in self._tenants and len(self._tenants) >= MAX_TENANT_SERIES:
            return OTHER_TENANTS
        self._tenants.add(tenant)
        return tenant


class RequestTracker:
    """One request's token counts, from its outputs, and its latencies, from the engine's
    timings on its last output (the same for streamed and whole responses)."""

    def __init__(self, metrics: Metrics, adapter: str, tenant: str | None = None):
        self.m, self.adapter, self.tenant = metrics, adapter, tenant
        self.prompt_tokens: int | None = None
        self.generated = 0
        self.finish: dict[int, Any] = {}
        self.final: RequestOutput | None = None

    def observe(self, out: RequestOutput) -> None:
        m, a = self.m, self.adapter
        if self.prompt_tokens is None:
            self.prompt_tokens = len(out.prompt_token_ids)
            m.labels(a, m.prompt_tokens, a).inc(self.prompt_tokens)
            m.total_prompt += self.prompt_tokens
        new = sum(len(c.token_ids) for c in out.outputs)
        self.generated += new
        m.labels(a, m.generation_tokens, a).inc(new)
        m.total_generated += new
        for c in out.outputs:
            if c.finish_reason is not None:
                self.finish[c.index] = c.finish_reason
        if out.finished:
            self.final = out

    def done(self, replica: str | None = None, params: Any = None) -> None:
        """The request ended; ``replica`` served it (None on a single server). Its
        histograms and counters are recorded once, here."""
        m, a = self.m, self.adapter
        engine = "0" if replica is None else replica
        v = (m.model_name, engine)
        m.v_prompt.labels(*v).inc(self.prompt_tokens or 0)
        m.v_generation.labels(*v).inc(self.generated)
        n = params.n if params is not None else max(1, len(self.finish))
        for index in range(n):  # one the client left before its end was aborted
            self.finish.setdefault(index, "abort")
        for reason in self.finish.values():
            m.labels(a, m.success, a, str(reason)).inc()
            m.v_success.labels(*v, str(reason)).inc()
        if replica is not None:
            m.labels(a, m.by_replica, replica, a).inc()
            m.labels(a, m.replica_tokens, replica, a).inc(self.generated)
        if params is not None:
            m.v_hist["n"].labels(*v).observe(params.n)
            if params.max_tokens is not None:
                m.v_hist["max_tokens"].labels(*v).observe(params.max_tokens)
        out = self.final
        t = out.metrics if out is not None else None
        if t is None:
            return
        h = {key: hist.labels(*v) for key, hist in m.v_hist.items()}
        h["prompt_len"].observe(self.prompt_tokens or 0)
        h["gen_len"].observe(self.generated)
        end = t.finished_time or t.last_token_time
        h["e2e"].observe(max(0.0, end - t.arrival_time))
        m.labels(a, m.e2e, a).observe(max(0.0, end - t.arrival_time))
        scheduled = t.first_scheduled_time
        if scheduled is not None:
            h["queue"].observe(max(0.0, scheduled - t.arrival_time))
            m.labels(a, m.queue, a).observe(max(0.0, scheduled - t.arrival_time))
            if self.tenant is not None:
                tenant = m.tenant_label(self.tenant)
                m.tenant_queue.labels(tenant).observe(max(0.0, scheduled - t.arrival_time))
            h["inference"].observe(max(0.0, t.last_token_time - scheduled))
        if t.first_token_time is not None:
            ttft = max(0.0, t.first_token_time - t.arrival_time)
            h["ttft"].observe(ttft)
            m.labels(a, m.ttft, a).observe(ttft)
            if scheduled is not None:
                h["prefill"].observe(max(0.0, t.first_token_time - scheduled))
            h["decode"].observe(max(0.0, t.last_token_time - t.first_token_time))
            if self.generated > 1:
                tpot = (t.last_token_time - t.first_token_time) / (self.generated - 1)
                h["tpot"].observe(max(0.0, tpot))
        itl = m.labels(a, m.itl, a)
        for gap in t.token_gaps or ():
            h["itl"].observe(gap)
            itl.observe(gap)
