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

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from loraplex.entrypoints.ray.routing import ReplicaView, rank_replicas


class AdapterAffinityRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self._placed: dict[str, ReplicaID] = {}  # adapter -> the replica it was last sent to

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
            held |= {a for a, placed in self._placed.items() if placed == r.replica_id}
            ongoing = self.replica_queue_len_cache.get(r.replica_id) or 0
            views.append(ReplicaView(rid, frozenset(held), ongoing, r.max_ongoing_requests))
        return [[by_id[v.replica_id] for v in rank] for rank in rank_replicas(adapter, views)]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        adapter = pending_request.metadata.multiplexed_model_id
        if adapter:
            self._placed[adapter] = replica_id
