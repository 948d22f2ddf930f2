"""Adapter-affinity routing: which replica a request for an adapter should go to.

A replica that already holds the adapter in its host tier (``max_cpu_loras``, not only its
device slots: a host-tier hit is a copy, a miss is a disk read) serves it, unless that
replica is full or loaded well above the least loaded one; then the least loaded replica,
which loads the adapter (so a hot adapter spreads over more replicas as its load grows).
Base-model requests, and adapters nobody holds near the least load, go to the least loaded
replica, preferring one with room in its host tier. The policy is a pure function of what
each replica reports, so the Ray Serve router and the simulation
(``benches/bench_routing.py``) run the same code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaView:
    """What the router knows of one replica."""

    replica_id: str
    adapters: frozenset[str]  # held in its host tier
    ongoing: int  # requests in flight
    max_ongoing: int  # its limit (Ray Serve's max_ongoing_requests)
    max_adapters: int = 0  # its host tier's size (0: unknown)

    @property
    def load(self) -> float:
        return self.ongoing / max(self.max_ongoing, 1)

    @property
    def full(self) -> bool:
        return self.ongoing >= self.max_ongoing

    @property
    def has_room(self) -> bool:
        return self.max_adapters <= 0 or len(self.adapters) < self.max_adapters


# a holder of the adapter loaded this much more (a share of its max_ongoing_requests) than
# the least loaded replica is passed over: the request spills there, which loads the
# adapter (a hot adapter spreads over replicas as its load grows)
SPILL = 0.25
# ... and by at least this many requests: a replica's count can lag by one (a request just
# answered is still being torn down there), which must not move an adapter off its holder
MIN_SPILL_REQUESTS = 2


def spill_margin(replica: ReplicaView) -> float:
    """How much busier (in load) than the least loaded replica ``replica`` may be and still
    take its adapters' requests."""
    return max(SPILL, MIN_SPILL_REQUESTS / max(replica.max_ongoing, 1))


def rendezvous(adapter: str | None, replica_id: str) -> bytes:
    """The last tie-break for an adapter its replica does not hold: a hash of the adapter
    and the replica (rendezvous hashing), so replicas alike in room, load and count each
    take a fair share of new adapters, the same replica for the same name, instead of the
    first by id taking them all (evicting its own while the others' tiers stay as they
    are)."""
    if adapter is None:
        return b""
    key = f"{adapter}\0{replica_id}".encode()
    return hashlib.blake2b(key, digest_size=8).digest()


def rank_replicas(
    adapter: str | None, replicas: list[ReplicaView], last: str | None = None
) -> list[list[ReplicaView]]:
    """Every replica once, in ranks (the first is preferred): holders of ``adapter`` that are
    not full and within ``spill_margin`` of the least loaded replica, least loaded first;
    the other replicas within it, those with room in the host tier first, then by load, then
    the one holding fewer adapters (new adapters spread over idle replicas), then by
    ``rendezvous``; the rest that are not full, least loaded first; the full ones. Among
    holders equally loaded, ``last`` (the replica the adapter was last sent to) comes first:
    an adapter held by several replicas keeps going to one while the load allows."""
    open_ = [r for r in replicas if not r.full]
    floor = min((r.load for r in open_), default=0.0)
    holders, near, far, full = [], [], [], []
    for r in replicas:
        if r.full:
            full.append(r)
        elif r.load > floor + spill_margin(r):
            far.append(r)
        elif adapter is not None and adapter in r.adapters:
            holders.append(r)
        else:
            near.append(r)
    by_load = lambda r: (r.load, r.replica_id)  # noqa: E731
    by_room = lambda r: (  # noqa: E731
        not r.has_room,
        r.load,
        len(r.adapters),
        rendezvous(adapter, r.replica_id),
        r.replica_id,
    )
    sticky = lambda r: (r.load, r.replica_id != last, r.replica_id)  # noqa: E731
    ranks = [sorted(holders, key=sticky), sorted(near, key=by_room)]
    ranks += [sorted(far, key=by_load), sorted(full, key=by_load)]
    return [rank for rank in ranks if rank]


def choose_replica(
    adapter: str | None, replicas: list[ReplicaView], last: str | None = None
) -> ReplicaView:
    """The first replica of the first rank."""
    if not replicas:
        raise ValueError("no replica to route to")
    return rank_replicas(adapter, replicas, last)[0][0]
