"""The engines' state as Prometheus gauges and counters, read from the engine client's
snapshot (``engine_stats``, keyed by replica) at scrape time: vLLM's by vLLM's names and
labels, beside loraplex's per adapter and per tenant."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def engine_families(model_name: str, stats: dict[str | None, dict[str, Any]]):
    """Gauges (and the preemption counter) from engine snapshots keyed by replica id (None:
    the one engine of this process)."""
    by_replica = any(key is not None for key in stats)
    extra = ["replica"] if by_replica else []
    engine = [(("0" if replica is None else replica), snap) for replica, snap in stats.items()]
    vllm_gauges = [
        ("vllm:num_requests_running", "Number of requests in model execution batches.", "running"),
        ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "waiting"),
    ]
    for name, doc, key in vllm_gauges:
        family = GaugeMetricFamily(name, doc, labels=["model_name", "engine"])
        for eng, snap in engine:
            family.add_metric([model_name, eng], float(snap[key]))
        yield family
    usage = GaugeMetricFamily(
        "vllm:kv_cache_usage_perc",
        "KV-cache usage. 1 means 100 percent usage.",
        labels=["model_name", "engine"],
    )
    preempted = CounterMetricFamily(
        "vllm:num_preemptions",
        "Cumulative number of preemption from the engine.",
        labels=["model_name", "engine"],
    )
    lora_info = GaugeMetricFamily(
        "vllm:lora_requests_info",
        "Running stats on lora requests.",
        labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters", *extra],
    )
    for eng, snap in engine:
        total = snap["kv_total_blocks"] or 1
        usage.add_metric([model_name, eng], 1.0 - snap["kv_free_blocks"] / total)
        preempted.add_metric([model_name, eng], float(snap.get("num_preemptions", 0)))
        labels = [
            str(snap.get("max_loras", 0)),
            ",".join(snap.get("waiting_adapters", [])),
            ",".join(snap.get("running_adapters", [])),
        ]
        lora_info.add_metric(labels + ([eng] if by_replica else []), time.time())
    yield usage
    yield preempted
    yield lora_info
    for key, name, doc in (
        (
            "queries",
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        ),
        (
            "hits",
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
        ),
    ):
        family = CounterMetricFamily(name, doc, labels=["model_name", "engine"])
        for eng, snap in engine:
            family.add_metric([model_name, eng], float(snap.get(f"prefix_cache_{key}", 0)))
        yield family
    service = GaugeMetricFamily(
        "loraplex:fair_share_service",
        "Each client's weighted service under scheduling_policy=fair: prompt tokens x 1 plus "
        "generated tokens x 2, over its weight (the base model under its name).",
        labels=["adapter", *extra],
    )
    tenants = GaugeMetricFamily(
        "loraplex:tenant_fair_share_service",
        "Each tenant's (a request's `user`) weighted service under scheduling_policy=fair, as "
        "loraplex:fair_share_service: those with a weight, and the 64 busiest others.",
        labels=["tenant", *extra],
    )
    for replica, snap in stats.items():
        more = [replica] if by_replica else []
        for adapter, value in snap.get("fair_service", {}).items():
            service.add_metric([adapter or model_name, *more], value)
        for tenant, value in snap.get("tenant_service", {}).items():
            tenants.add_metric([tenant, *more], value)
    yield service
    yield tenants
    for i, (name, doc) in enumerate(
        (
            (
                "loraplex:lora_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache, per adapter (the base: its name).",
            ),
            (
                "loraplex:lora_prefix_cache_hits",
                "Prompt tokens found in the prefix cache, per adapter (the base: its name).",
            ),
        )
    ):
        family = CounterMetricFamily(name, doc, labels=["adapter", *extra])
        for replica, snap in stats.items():
            for adapter, counts in snap.get("prefix_cache_by_adapter", {}).items():
                labels = [adapter or model_name] + ([replica] if by_replica else [])
                family.add_metric(labels, float(counts[i]))
        yield family
    gauges = [
        ("running", "loraplex:num_requests_running", "Requests running (in the batch)."),
        ("waiting", "loraplex:num_requests_waiting", "Requests waiting to be scheduled."),
        ("kv_free_blocks", "loraplex:kv_cache_free_blocks", "Free KV cache blocks."),
        ("kv_total_blocks", "loraplex:kv_cache_total_blocks", "KV cache blocks."),
    ]
    for key, name, doc in gauges:
        family = GaugeMetricFamily(name, doc, labels=extra)
        for replica, snap in stats.items():
            family.add_metric([replica] if by_replica else [], float(snap[key]))
        yield family
    loaded = GaugeMetricFamily(
        "loraplex:lora_adapter_loaded",
        "1 where an adapter's weights are: a device slot or the host tier.",
        labels=["adapter", "tier", "pinned", *extra],
    )
    for replica, snap in stats.items():
        for a in snap["adapters"]:
            for tier in a["tiers"]:
                labels = [a["name"], tier, str(a["pinned"]).lower()]
                loaded.add_metric(labels + ([replica] if by_replica else []), 1.0)
    yield loaded
