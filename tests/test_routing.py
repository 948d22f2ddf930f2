"""The adapter-affinity routing policy: properties over any cluster state (hypothesis), and
in the simulation (``benches/bench_routing.py``, the same code) it beats random and
round-robin routing on adapter hits without unbalancing the replicas."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraplex.entrypoints.ray.routing import (
    ReplicaView,
    choose_replica,
    rank_replicas,
    spill_margin,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
from bench_routing import POLICIES, simulate  # noqa: E402

ADAPTERS = [f"a{i}" for i in range(6)]


@st.composite
def clusters(draw):
    n = draw(st.integers(1, 8))
    views = []
    for i in range(n):
        limit = draw(st.integers(1, 16))
        views.append(
            ReplicaView(
                f"r{i}",
                frozenset(draw(st.sets(st.sampled_from(ADAPTERS), max_size=4))),
                draw(st.integers(0, limit + 2)),
                limit,
                draw(st.integers(0, 5)),
            )
        )
    return views


@given(clusters(), st.one_of(st.none(), st.sampled_from(ADAPTERS)))
def test_ranks_partition_the_replicas_and_prefer_unloaded_holders(views, adapter):
    ranks = rank_replicas(adapter, views)
    flat = [r.replica_id for rank in ranks for r in rank]
    assert sorted(flat) == sorted(v.replica_id for v in views)  # each exactly once
    assert all(rank for rank in ranks)
    for rank in ranks:  # least loaded first within a rank (among replicas with as much room)
        for r, s in zip(rank, rank[1:]):
            if r.has_room == s.has_room:
                assert r.load <= s.load
    first = ranks[0]
    open_ = [v for v in views if not v.full]
    floor = min((v.load for v in open_), default=0.0)
    holders = [v for v in open_ if adapter in v.adapters and v.load <= floor + spill_margin(v)]
    chosen = choose_replica(adapter, views)
    if holders:  # a holder near the least load is always chosen over any other replica
        assert set(first) == set(holders)
        assert chosen in holders
    elif open_:  # never a full replica while one is not; else the least loaded
        assert not chosen.full and chosen.load <= floor + spill_margin(chosen)
    else:
        assert chosen.load == min(v.load for v in views)


def test_a_busy_holder_spills_to_the_least_loaded_replica():
    views = [
        ReplicaView("r0", frozenset({"a"}), 30, 32),  # holds it, far above the others
        ReplicaView("r1", frozenset(), 10, 32),
        ReplicaView("r2", frozenset({"b"}), 4, 32),
    ]
    assert choose_replica("a", views).replica_id == "r2"
    assert choose_replica("b", views).replica_id == "r2"
    views[0] = ReplicaView("r0", frozenset({"a"}), 12, 32)  # within SPILL of the least
    assert choose_replica("a", views).replica_id == "r0"
    views[0] = ReplicaView("r0", frozenset({"a"}), 32, 32)  # full: never
    views[1] = ReplicaView("r1", frozenset(), 31, 32)
    views[2] = ReplicaView("r2", frozenset(), 30, 32)
    assert choose_replica("a", views).replica_id == "r2"


def test_at_small_limits_a_holder_two_requests_ahead_keeps_its_adapter():
    """A replica's count can lag by one; with max_ongoing 4 a quarter is one request, so the
    margin is two requests."""
    views = [ReplicaView("r0", frozenset({"a"}), 2, 4), ReplicaView("r1", frozenset(), 0, 4)]
    assert choose_replica("a", views).replica_id == "r0"
    views[0] = ReplicaView("r0", frozenset({"a"}), 3, 4)
    assert choose_replica("a", views).replica_id == "r1"


def test_an_adapter_held_twice_keeps_to_the_replica_it_was_last_sent_to():
    views = [ReplicaView(f"r{i}", frozenset({"a"}), 1, 8, 4) for i in range(3)]
    for last in ("r0", "r1", "r2"):
        assert choose_replica("a", views, last).replica_id == last
    views[2] = ReplicaView("r2", frozenset({"a"}), 2, 8, 4)  # busier: the least loaded wins
    assert choose_replica("a", views, "r2").replica_id == "r0"


def test_new_adapters_spread_over_equally_loaded_replicas():
    """At equal load a new adapter goes to the replica holding fewer (not the first by id),
    so adapters placed on an idle cluster fill every replica."""
    views = [ReplicaView(f"r{i}", frozenset(), 0, 8, 4) for i in range(3)]
    for n in range(6):
        chosen = choose_replica(f"n{n}", views)
        views = [
            ReplicaView(v.replica_id, v.adapters | {f"n{n}"}, 0, 8, 4) if v == chosen else v
            for v in views
        ]
    assert sorted(len(v.adapters) for v in views) == [2, 2, 2]


@pytest.mark.parametrize("load", [0.7, 0.95])
def test_simulation_affinity_hits_more_without_unbalancing(load):
    """1,000 zipf adapters over 16 replicas of 64 host slots (a short run of the bench), at
    moderate load and near saturation."""
    rows = {
        name: simulate(policy, load=load, ticks=400, seed=3) for name, policy in POLICIES.items()
    }
    ours = rows["adapter affinity"]
    for other in ("random", "round robin"):
        assert ours["adapter_hit_rate"] > rows[other]["adapter_hit_rate"] + 0.1, rows
        assert ours["inflight_max_over_mean"] <= 1.5 * rows[other]["inflight_max_over_mean"]
    assert ours["served_max_over_mean"] < 1.25, rows


def test_new_adapters_spread_over_replicas_whose_tiers_are_full():
    """Equally loaded replicas whose host tiers are full (a new adapter evicts one there):
    new adapters still spread, each name to one replica every time, rather than all to
    the first replica by id while the others' tiers stay as they are."""
    views = [
        ReplicaView(f"r{i}", frozenset(f"held-{i}-{j}" for j in range(4)), 0, 8, 4)
        for i in range(3)
    ]
    names = [f"n{k}" for k in range(90)]
    chosen = {n: choose_replica(n, views).replica_id for n in names}
    shares = {v.replica_id: list(chosen.values()).count(v.replica_id) for v in views}
    assert min(shares.values()) >= 15, shares
    assert chosen == {n: choose_replica(n, list(reversed(views))).replica_id for n in names}
