"""The Ray Serve request router that runs loraplex's adapter-affinity policy
(``routing.rank_replicas``) for a deployment's handle.

The request's adapter is its multiplexed model id. A replica "holds" an adapter if it reports
it (Ray's multiplexed model ids, reported asynchronously) or if this router sent it that
adapter last, so requests sent before a replica's report arrives do not scatter (seen with
Ray's default router: 3 models over 2 replicas of 2 model slots each, sent one at a time,
went to both replicas in turn). A replica's host tier, not its device slots, is what
"holds" means (``max_num_models_per_replica`` = ``max_cpu_loras``).
"""

from __future__ import annotations

from collections import OrderedDict

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from loraplex.entrypoints.ray.routing import ReplicaView, rank_replicas


class AdapterAffinityRouter(RequestRouter):
    """``request_router_kwargs={"max_adapters": N}``: each replica's host tier size (its
    ``max_cpu_loras``); the adapters this router sent a replica are remembered as an LRU of
    that size, as the replica's tier holds them."""

    def initialize_state(self, max_adapters: int = 0, **kwargs) -> None:
        self._max_adapters = max_adapters
        self._placed: dict[str, ReplicaID] = {}  # adapter -> the replica it was last sent to
        self._sent: dict[ReplicaID, OrderedDict[str, None]] = {}  # replica -> its LRU

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        adapter = None
        if pending_request is not None:
            adapter = pending_request.metadata.multiplexed_model_id or None
        by_id, views = {}, []
        for r in candidate_replicas:
            rid = r.replica_id.unique_id
            by_id[rid] = r
            held = set(r.multiplexed_model_ids)
            held.update(self._sent.get(r.replica_id, ()))
            ongoing = self.replica_queue_len_cache.get(r.replica_id) or 0
            views.append(
                ReplicaView(
                    rid, frozenset(held), ongoing, r.max_ongoing_requests, self._max_adapters
                )
            )
        last = self._placed.get(adapter) if adapter else None
        ranks = rank_replicas(adapter, views, last.unique_id if last is not None else None)
        return [[by_id[v.replica_id] for v in rank] for rank in ranks]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        adapter = pending_request.metadata.multiplexed_model_id
        if not adapter:
            return
        previous = self._placed.get(adapter)
        if previous is not None and previous != replica_id:
            self._sent[previous].pop(adapter, None)
        self._placed[adapter] = replica_id
        lru = self._sent.setdefault(replica_id, OrderedDict())
        lru[adapter] = None
        lru.move_to_end(adapter)
        while self._max_adapters and len(lru) > self._max_adapters:
            evicted, _ = lru.popitem(last=False)
            del self._placed[evicted]
