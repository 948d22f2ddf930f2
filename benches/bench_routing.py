"""Routing across replicas, simulated: the real policy (``loraplex.entrypoints.ray.routing``)
against random and round-robin routing, with fake engines.

1,000 adapters with a zipf popularity (exponent 1.1; a share of requests for the base model),
16 replicas each holding ``--host`` adapters in an LRU host tier and serving at most
``--max-ongoing`` requests at once. Time runs in ticks: Poisson arrivals (``--load`` of the
cluster's capacity), each request in flight for 8-24 ticks. Reported per policy: the
adapter hit rate (requests that found their adapter in the replica's host tier: no disk
read) and the load imbalance (the busiest replica's requests over the mean, and the mean
over ticks of the most in-flight requests on a replica over the mean). And the prefix
cache's share of it (issue 28): each adapter is a tenant with its own system prompt, the
base model's requests use one of 16 system prompts (zipf too); each replica's KV cache keeps
``--prefixes`` system prompts warm (LRU); a request hits when its replica holds its prompt's
blocks. The cache never shares blocks across adapters, so an adapter's prefixes are warm
exactly where its weights are; the question is whether routing should weigh prefixes too.

    .venv/bin/python benches/bench_routing.py [--adapters 1000] [--replicas 16] [--host 64]

Prints one JSON line per policy.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import OrderedDict
from collections.abc import Callable

from loraplex.entrypoints.ray.routing import ReplicaView, choose_replica

# (adapter, replicas, rng, request number, the replica the adapter was last sent to)
Policy = Callable[[str | None, list[ReplicaView], random.Random, int, str | None], ReplicaView]


def affinity(adapter, views, rng, tick, last):
    return choose_replica(adapter, views, last)


def uniform(adapter, views, rng, tick, last):
    return rng.choice(views)


def round_robin(adapter, views, rng, tick, last):
    return views[tick % len(views)]


POLICIES: dict[str, Policy] = {
    "adapter affinity": affinity,
    "random": uniform,
    "round robin": round_robin,
}


class FakeReplica:
    """A replica's host tier (LRU) and its requests in flight (end ticks)."""

    def __init__(self, name: str, host: int, max_ongoing: int, prefixes: int = 32):
        self.name, self.host, self.max_ongoing = name, host, max_ongoing
        self.tier: OrderedDict[str, None] = OrderedDict()
        self.prefixes: OrderedDict[str, None] = OrderedDict()
        self.max_prefixes = prefixes
        self.ends: list[int] = []
        self.served = 0

    def view(self) -> ReplicaView:
        return ReplicaView(
            self.name, frozenset(self.tier), len(self.ends), self.max_ongoing, self.host
        )

    def warm(self, prefix: str) -> bool:
        """Whether ``prefix``'s blocks were cached here; they are now (LRU)."""
        hit = prefix in self.prefixes
        self.prefixes[prefix] = None
        self.prefixes.move_to_end(prefix)
        while len(self.prefixes) > self.max_prefixes:
            self.prefixes.popitem(last=False)
        return hit

    def admit(self, adapter: str | None, end: int) -> bool:
        """Takes the request; True if its adapter was already held (or it needs none)."""
        self.ends.append(end)
        self.served += 1
        if adapter is None:
            return True
        hit = adapter in self.tier
        self.tier[adapter] = None
        self.tier.move_to_end(adapter)
        while len(self.tier) > self.host:
            self.tier.popitem(last=False)
        return hit


def simulate(
    policy: Policy,
    adapters: int = 1000,
    replicas: int = 16,
    host: int = 64,
    max_ongoing: int = 32,
    load: float = 0.7,
    ticks: int = 4000,
    base_share: float = 0.1,
    seed: int = 0,
    prefixes: int = 32,
) -> dict:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.1 for k in range(adapters)]
    names = [f"a{k}" for k in range(adapters)]
    fleet = [FakeReplica(f"r{i}", host, max_ongoing, prefixes) for i in range(replicas)]
    base_prompts = [f"base-p{k}" for k in range(16)]
    base_weights = [1 / (k + 1) ** 1.1 for k in range(16)]
    prefix_hits = base_requests = base_prefix_hits = 0
    rate = load * replicas * max_ongoing / 16  # arrivals per tick (mean service: 16 ticks)
    requests = hits = 0
    spread = []
    last: dict[str, str] = {}  # adapter -> the replica it was last sent to
    for tick in range(ticks):
        for r in fleet:
            r.ends = [e for e in r.ends if e > tick]
        arrivals = _poisson(rng, rate)
        for _ in range(arrivals):
            adapter = None if rng.random() < base_share else rng.choices(names, weights)[0]
            views = [r.view() for r in fleet]
            chosen = policy(adapter, views, rng, requests, last.get(adapter))
            if adapter is not None:
                last[adapter] = chosen.replica_id
            replica = fleet[int(chosen.replica_id[1:])]
            hits += replica.admit(adapter, tick + rng.randint(8, 24))
            requests += 1
            if adapter is None:
                warm = replica.warm(rng.choices(base_prompts, base_weights)[0])
                base_requests += 1
                base_prefix_hits += warm
            else:
                warm = replica.warm(adapter)  # its tenant's system prompt
            prefix_hits += warm
        inflight = [len(r.ends) for r in fleet]
        if sum(inflight):
            spread.append(max(inflight) / (sum(inflight) / replicas))
    served = [r.served for r in fleet]
    return {
        "requests": requests,
        "adapter_hit_rate": round(hits / requests, 3),
        "served_max_over_mean": round(max(served) / (sum(served) / replicas), 3),
        "inflight_max_over_mean": round(sum(spread) / len(spread), 3),
        "prefix_hit_rate": round(prefix_hits / requests, 3),
        "base_prefix_hit_rate": round(base_prefix_hits / max(1, base_requests), 3),
    }


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method, in chunks so large means stay exact."""
    total = 0
    while mean > 0:
        chunk = min(mean, 30.0)
        mean -= chunk
        limit, k, p = pow(2.718281828459045, -chunk), 0, 1.0
        while True:
            p *= rng.random()
            if p <= limit:
                break
            k += 1
        total += k
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--host", type=int, default=64, help="each replica's max_cpu_loras")
    ap.add_argument("--max-ongoing", type=int, default=32)
    ap.add_argument("--load", type=float, default=0.7, help="offered load / capacity")
    ap.add_argument("--ticks", type=int, default=4000)
    ap.add_argument("--prefixes", type=int, default=32, help="system prompts a replica keeps warm")
    args = ap.parse_args()
    for name, policy in POLICIES.items():
        row = simulate(
            policy,
            args.adapters,
            args.replicas,
            args.host,
            args.max_ongoing,
            args.load,
            args.ticks,
            prefixes=args.prefixes,
        )
        print(json.dumps({"policy": name, **vars(args), **row}), flush=True)


if __name__ == "__main__":
    main()
