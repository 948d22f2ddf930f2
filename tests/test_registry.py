"""AdapterRegistry: the id uniqueness vLLM documents but does not enforce."""

import threading

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from loraplex import AdapterConflictError, AdapterRegistry, LoRARequest, UnknownAdapterError


@pytest.mark.parametrize(
    "clash, reason",
    [
        (LoRARequest("code", 1, "/a/code"), "id 1 is already taken"),
        (LoRARequest("sql", 2, "/a/sql"), "name 'sql' is already taken"),
        (LoRARequest("sql", 1, "/b/sql"), "different path"),
    ],
)
def test_conflict_names_both_adapters(clash, reason):
    reg = AdapterRegistry()
    assert reg.register(LoRARequest("sql", 1, "/a/sql")) is True
    with pytest.raises(AdapterConflictError) as info:
        reg.register(clash)
    msg = str(info.value)
    assert "'sql' (id 1, path /a/sql)" in msg
    assert f"'{clash.lora_name}' (id {clash.lora_int_id}, path {clash.lora_path})" in msg
    assert reason in msg
    assert isinstance(info.value, ValueError)
    assert len(reg) == 1


def test_identical_register_is_noop_and_unregister_frees():
    reg = AdapterRegistry()
    sql = LoRARequest("sql", 1, "/a")
    assert reg.register(sql) is True
    assert reg.register(LoRARequest("sql", 1, "/a")) is False
    assert 1 in reg and len(reg) == 1
    assert reg.unregister(1) == sql
    assert 1 not in reg
    with pytest.raises(UnknownAdapterError, match="unknown adapter id 1"):
        reg.unregister(1)
    with pytest.raises(LookupError):
        reg.unregister(1)
    assert reg.register(LoRARequest("code", 1, "/c")) is True
    got = reg.get(1)
    assert got is not None and got.lora_path == "/c"
    assert reg.get_by_name("code") == LoRARequest("code", 1, "/c")
    assert reg.get(2) is None and reg.get_by_name("sql") is None
    assert reg.ids() == [1]


def test_concurrent_threads_keep_ids_unique():
    reg = AdapterRegistry()
    wins: list[tuple[int, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(1, 51):
            try:
                if reg.register(LoRARequest(f"t{t}-{i}", i, f"/p/{t}")):
                    with lock:
                        wins.append((t, i))
            except AdapterConflictError:
                pass

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(i for _, i in wins) == list(range(1, 51))
    for t, i in wins:
        got = reg.get(i)
        assert got is not None and got.lora_name == f"t{t}-{i}"


class RegistryModel(RuleBasedStateMachine):
    """The registry against a dict model: id -> (name, path)."""

    def __init__(self) -> None:
        super().__init__()
        self.reg = AdapterRegistry()
        self.model: dict[int, tuple[str, str]] = {}

    @rule(
        name=st.sampled_from("abcd"), lora_id=st.integers(1, 5), path=st.sampled_from(["/x", "/y"])
    )
    def register(self, name, lora_id, path):
        by_name = {n: i for i, (n, _) in self.model.items()}
        held = self.model.get(lora_id)
        if held == (name, path):
            assert self.reg.register(LoRARequest(name, lora_id, path)) is False
        elif held is not None or name in by_name:
            with pytest.raises(AdapterConflictError):
                self.reg.register(LoRARequest(name, lora_id, path))
        else:
            assert self.reg.register(LoRARequest(name, lora_id, path)) is True
            self.model[lora_id] = (name, path)

    @rule(lora_id=st.integers(1, 5))
    def unregister(self, lora_id):
        if lora_id in self.model:
            assert self.reg.unregister(lora_id).lora_name == self.model.pop(lora_id)[0]
        else:
            with pytest.raises(UnknownAdapterError):
                self.reg.unregister(lora_id)

    @invariant()
    def agrees(self):
        assert self.reg.ids() == sorted(self.model)
        for i, (n, p) in self.model.items():
            got = self.reg.get_by_name(n)
            assert got is not None and (got.lora_int_id, got.lora_path) == (i, p)


TestRegistryModel = RegistryModel.TestCase
