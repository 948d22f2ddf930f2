"""An engine's state as plain data, for the server's metrics and a replica's reports: queue
sizes, KV blocks, preemptions, and every registered adapter with where its weights are and
whether requests for it run or wait."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraplex.engine.llm_engine import LLMEngine


def engine_stats(engine: LLMEngine) -> dict[str, Any]:
    core = engine.scheduler
    running: set[str] = set()
    waiting: set[str] = set()
    for request in engine.unfinished_requests():
        lora = request.lora_request
        if lora is not None:
            started = request.metrics.first_scheduled_time is not None
            (running if started else waiting).add(lora.lora_name)
    adapters = []
    for lora in core.registered_adapters():
        where = core.adapter_residency(lora.lora_int_id)
        on_device, in_host, pinned = where if where is not None else (False, False, False)
        tiers = [t for t, present in (("device", on_device), ("host", in_host)) if present]
        adapters.append(
            dict(
                name=lora.lora_name,
                lora_int_id=lora.lora_int_id,
                path=lora.lora_path,
                tiers=tiers,
                pinned=bool(pinned),
            )
        )
    fair, tenants = {}, {}
    if engine.args.scheduling_policy == "fair":
        fair[""] = core.client_service(0)
        fair.update({a["name"]: core.client_service(a["lora_int_id"]) for a in adapters})
        tenants = tenant_shares(core.tenant_service(), engine.fair_weights)
    return dict(
        fair_service=fair,
        tenant_service=tenants,
        running=core.num_running,
        waiting=core.num_waiting,
        kv_free_blocks=core.num_free_blocks,
        kv_total_blocks=engine.num_kv_blocks,
        num_preemptions=engine.num_preemptions,
        prefix_cache_queries=engine.prefix_queries,
        prefix_cache_hits=engine.prefix_hits,
        prefix_cache_by_adapter={k: tuple(v) for k, v in engine.prefix_by_adapter.items()},
        max_loras=engine.args.max_loras if engine.args.enable_lora else 0,
        running_adapters=sorted(running),
        waiting_adapters=sorted(waiting),
        adapters=adapters,
    )


#: Tenants reported one by one besides those named in ``fair_share_weights`` (tenants are
#: named by requests: their number is the clients', not the operator's, to choose).
MAX_TENANT_SERIES = 64


def tenant_shares(known: list[tuple[str, float, int]], weights: dict) -> dict[str, float]:
    """Each reported tenant's weighted service: those with a weight, and the
    ``MAX_TENANT_SERIES`` others with the most unfinished requests (ties by name)."""
    weighted = {name for name in weights if isinstance(name, str)}
    named = [(name, service) for name, service, _ in known if name in weighted]
    others = sorted((t for t in known if t[0] not in weighted), key=lambda t: (-t[2], t[0]))[
        :MAX_TENANT_SERIES
    ]
    return dict(named + [(name, service) for name, service, _ in others])
