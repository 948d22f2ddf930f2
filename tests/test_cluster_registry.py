"""The cluster's adapter registry: its rules under any sequence of calls (hypothesis), and
one named Ray actor that separate workers share, so a clash made through one is refused
through another."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraplex.entrypoints.ray.registry import AdapterRegistry, RegistryError

NAMES = ["sql", "code", "chat", "law"]
PATHS = ["/a", "/b", "/c"]

calls = st.lists(
    st.one_of(
        st.tuples(
            st.just("register"),
            st.sampled_from(NAMES),
            st.sampled_from(PATHS),
            st.one_of(st.none(), st.integers(1, 6)),
            st.booleans(),
        ),
        st.tuples(st.just("unregister"), st.sampled_from(NAMES)),
    ),
    max_size=30,
)


@given(calls)
def test_ids_are_unique_stable_and_versions_count_replacements(sequence):
    reg = AdapterRegistry()
    first_id: dict[str, int] = {}
    for call in sequence:
        if call[0] == "unregister":
            reg.unregister(call[1])
            continue
        _, name, path, lora_id, replace = call
        before = reg.resolve(name)
        try:
            reg.check(name, path, lora_id, replace)
            checked = None
        except RegistryError as e:
            checked = str(e)
        assert reg.resolve(name) == before  # a check registers nothing
        try:
            entry = reg.register(name, path, lora_id, replace)
        except RegistryError as e:
            assert name in str(e)
            assert str(e) == checked  # refused exactly as the check said
            assert reg.resolve(name) == before  # a refusal changes nothing
            continue
        assert checked is None, checked
        assert entry["lora_int_id"] == first_id.setdefault(name, entry["lora_int_id"])
        if before is None:
            assert entry["version"] == 1
        elif before["path"] == path:
            assert entry == before
        else:
            assert entry["version"] == before["version"] + 1
        assert reg.resolve(name) == entry
        ids = [e["lora_int_id"] for e in reg.entries()]
        assert len(ids) == len(set(ids))  # no two names share an id
    for name, lora_id in first_id.items():  # ids are never handed to another name
        for other in NAMES:
            if other != name and reg.resolve(other):
                assert reg.resolve(other)["lora_int_id"] != lora_id


def test_what_is_refused_and_why():
    reg = AdapterRegistry()
    assert reg.register("sql", "/a", 3)["lora_int_id"] == 3
    with pytest.raises(RegistryError, match="lora_int_id 3 is already 'sql'"):
        reg.register("code", "/b", 3)
    with pytest.raises(RegistryError, match="registered with path '/a', not '/b'"):
        reg.register("sql", "/b")
    assert reg.register("sql", "/b", replace=True) == {
        "name": "sql",
        "lora_int_id": 3,
        "path": "/b",
        "version": 2,
    }
    assert reg.register("code", "/c")["lora_int_id"] == 1  # the lowest id nobody holds
    assert reg.unregister("sql") and reg.resolve("sql") is None
    with pytest.raises(RegistryError, match="lora_int_id 3 is already 'sql'"):
        reg.register("law", "/d", 3)  # a removed name keeps its id
    with pytest.raises(RegistryError, match="has lora_int_id 3 in this cluster, not 9"):
        reg.register("sql", "/a", 9)
    assert reg.register("sql", "/a")["lora_int_id"] == 3


def test_an_unregistered_adapter_is_released_once_every_replica_acted_on_it():
    reg = AdapterRegistry()
    reg.register("sql", "/a")
    reg.register("code", "/b")
    for replica in ("r1", "r2"):
        registered, epoch = reg.report(replica, {"held": ["sql", "code"], "registry_epoch": 0})
        assert set(registered) == {"sql", "code"} and epoch == 0
    first = reg.unregister("sql")
    assert reg.unregister("sql") is None  # not registered any more
    assert not reg.released("sql", first)  # both still hold it
    # r1's report was taken before it heard of the unregistration: it has not dropped it yet,
    # though its list no longer names it (an adapter may be out of its engine's tiers)
    registered, epoch = reg.report("r1", {"held": ["code"], "registry_epoch": 0})
    assert set(registered) == {"code"} and epoch == first
    reg.report("r2", {"held": ["code"], "registry_epoch": first})
    assert not reg.released("sql", first)  # r1 has not reported since acting on it
    reg.report("r1", {"held": ["code"], "registry_epoch": first})
    assert reg.released("sql", first)
    second = reg.unregister("code")
    assert second > first
    reg.report("r1", {"held": ["code"], "registry_epoch": second})  # in use there: kept
    reg.report("r2", {"held": [], "registry_epoch": second})
    assert not reg.released("code", second)
    assert reg.released("code", second, max_age_s=-1.0)  # a replica silent too long is out
    reg.forget_replica("r1")
    assert reg.released("code", second)


def test_a_clash_is_refused_through_another_worker():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install loraplex[ray])")
    from loraplex.entrypoints.ray.registry import cluster_registry

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="test")
    try:

        @ray.remote(num_cpus=0)
        def register(name, path, lora_id=None):
            return ray.get(cluster_registry().register.remote(name, path, lora_id))

        first = ray.get(register.remote("sql", "/adapters/sql", 7))
        assert first == {"name": "sql", "lora_int_id": 7, "path": "/adapters/sql", "version": 1}
        with pytest.raises(RegistryError, match="lora_int_id 7 is already 'sql'"):
            ray.get(register.remote("code", "/adapters/code", 7))
        second = ray.get(register.remote("code", "/adapters/code"))
        assert second["lora_int_id"] not in (7, None)
        assert ray.get(cluster_registry().resolve.remote("sql")) == first  # the same actor
    finally:
        ray.shutdown()
