"""The scheduler through its Python surface: errors, threads, and a hypothesis-driven run."""

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraplex import (
    AdapterNotLoadedError,
    InvalidConfigError,
    InvalidRequestError,
    LoRARequest,
    NoFreeSlotError,
    QueueFullError,
    Scheduler,
)


def load(s: Scheduler, plan) -> None:
    """An instant loader pool: every read the plan hands out is valid and copied at once."""
    for key, _request in plan.reads:
        status, slot = s.adapter_validated(key)
        if status == "slot":
            s.adapter_loaded(key, slot)
    for key, slot in plan.commits:
        s.adapter_loaded(key, slot)


def register(s: Scheduler, lora_id: int, ready: bool = True) -> int:
    key, _ = s.register_adapter(LoRARequest(f"a{lora_id}", lora_id, f"/adapters/{lora_id}"))
    if ready:
        status, _ = s.stage_adapter(key)
        assert status == "read"
        status, slot = s.adapter_validated(key, explicit=True)
        s.adapter_loaded(key, slot)
    return key


def run_to_completion(s: Scheduler, outputs: dict[int, int], max_steps: int = 10_000):
    """Drives the scheduler as the engine will: every request that samples gets one token;
    a request finishes after ``outputs[id]`` tokens. Returns the step plans."""
    generated: dict[int, int] = {}
    steps = []
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            return steps
        plan = s.schedule()
        steps.append(plan)
        load(s, plan)
        finished = []
        for row in plan.sample_rows:
            rid = plan.request_ids[row]
            generated[rid] = generated.get(rid, 0) + 1
            if generated[rid] == outputs[rid]:
                finished.append(rid)
        s.postprocess(finished)
    raise AssertionError("scheduler did not finish")


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        ({"max_loras": 0}, "max_loras must be >= 1"),
        ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras (2) must be >= max_loras (4)"),
        ({"max_num_seqs": 64, "max_num_batched_tokens": 32}, "max_num_batched_tokens (32)"),
        ({"num_blocks": 2, "block_size": 16, "max_model_len": 64}, "cannot hold one sequence"),
    ],
)
def test_bad_config_names_the_field(kwargs, culprit):
    with pytest.raises(InvalidConfigError) as info:
        Scheduler(**kwargs)
    assert culprit in str(info.value)
    assert isinstance(info.value, ValueError)


def test_defaults_follow_vllm():
    s = Scheduler(max_loras=3)
    assert s.max_cpu_loras == 3  # defaults to max_loras
    assert (s.max_num_seqs, s.block_size) == (256, 16)


def test_bad_requests_are_refused_and_others_still_run():
    s = Scheduler(max_model_len=32, num_blocks=8, block_size=4)
    with pytest.raises(InvalidRequestError, match="request 1: the prompt is empty"):
        s.add_request(1, 0)
    with pytest.raises(InvalidRequestError, match=r"request 2: the prompt \(33 tokens\)"):
        s.add_request(2, 33)
    s.add_request(3, 4, adapter_key=12345)  # no such adapter: refused when drained
    s.add_request(4, 5)
    steps = run_to_completion(s, {4: 3})
    assert {r for out in steps for r in out.request_ids} == {4}
    assert steps[0].ended == [(3, "its adapter was removed before the request was scheduled")]


def test_duplicate_id_is_rejected_without_losing_the_first():
    s = Scheduler()
    s.add_request(7, 3)
    s.add_request(7, 3)
    out = s.schedule()
    assert out.request_ids == [7]
    assert out.ended == [(7, "request id 7 is already in the scheduler")]


def test_full_queue_is_a_clear_error_and_loses_nothing():
    s = Scheduler(queue_capacity=4)
    for i in range(4):
        s.add_request(i, 2)
    with pytest.raises(QueueFullError, match="queue is full"):
        s.add_request(99, 2)
    first = s.schedule()
    assert sorted(first.request_ids) == [0, 1, 2, 3]
    s.postprocess([])
    s.add_request(99, 2)  # drained: room again
    assert 99 in s.schedule().request_ids


def test_submissions_from_many_threads_arrive_exactly_once():
    s = Scheduler(max_num_seqs=64, max_num_batched_tokens=512, num_blocks=4096)
    per = 200

    def submit(t: int) -> None:
        for i in range(per):
            rid = t * per + i
            while True:
                try:
                    s.add_request(rid, 1 + rid % 5, adapter_key=None)
                    break
                except QueueFullError:
                    pass

    threads = [threading.Thread(target=submit, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    steps = run_to_completion(s, dict.fromkeys(range(4 * per), 1))
    ran = [r for out in steps for r in out.request_ids]
    assert sorted(ran) == list(range(4 * per))


def test_pinning():
    s = Scheduler(max_loras=2, max_cpu_loras=3)
    k1, k2, k3 = register(s, 1), register(s, 2), register(s, 3)
    with pytest.raises(AdapterNotLoadedError, match="adapter 4 is not loaded"):
        s.pin_adapter(register(s, 4, ready=False))
    s.pin_adapter(k1)
    s.pin_adapter(k2)
    with pytest.raises(NoFreeSlotError, match="adapter 3"):
        s.pin_adapter(k3)
    s.add_request(0, 2, adapter_key=k3)  # no slot while both are pinned: refused
    s.add_request(1, 2, adapter_key=k1)
    out = s.schedule()
    assert sorted(slot for slot, *_ in out.loads) == [0, 1]  # the two pins
    assert out.request_ids == [1]
    assert [(i, "all 2 slots are pinned" in e) for i, e in out.ended] == [(0, True)]
    s.postprocess([1])
    assert s.unpin_adapter(k2) is True
    s.add_request(2, 2, adapter_key=k3)
    out = s.schedule()
    assert out.request_ids == [2]
    assert out.loads == [(1, k3, 2)]  # 2 was unpinned and gives its slot; 1 stays pinned


@st.composite
def workloads(draw):
    max_loras = draw(st.integers(1, 3))
    block_size = draw(st.sampled_from([1, 4, 16]))
    max_model_len = draw(st.integers(8, 40))
    max_num_seqs = draw(st.integers(1, 6))
    cfg = dict(
        max_loras=max_loras,
        max_cpu_loras=max_loras + draw(st.integers(0, 2)),
        block_size=block_size,
        max_model_len=max_model_len,
        num_blocks=-(-max_model_len // block_size) + draw(st.integers(0, 10)),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_seqs + draw(st.integers(0, 40)),
        max_skipped_steps=draw(st.integers(0, 4)),
    )
    reqs = draw(
        st.lists(
            st.tuples(
                st.integers(1, max_model_len),
                st.integers(1, 8),
                st.none() | st.integers(1, 6),
                st.integers(0, 1),
            ),
            min_size=1,
            max_size=25,
        )
    )
    return cfg, reqs


@given(workloads())
def test_property_batches_respect_every_limit(workload):
    cfg, reqs = workload
    s = Scheduler(**cfg)
    keys = {lora: register(s, lora, ready=False) for lora in range(1, 7)}
    key_of = {rid: keys.get(lora) for rid, (_, _, lora, _) in enumerate(reqs)}
    for rid, (prompt, _, _, prio) in enumerate(reqs):
        s.add_request(rid, prompt, adapter_key=key_of[rid], priority=prio)
    slots: dict[int, int] = {}
    steps = run_to_completion(s, {rid: r[1] for rid, r in enumerate(reqs)})
    for out in steps:
        assert out.num_batched_tokens <= cfg["max_num_batched_tokens"]
        assert len(out) <= cfg["max_num_seqs"]
        adapters = {key_of[r] for r in out.request_ids if key_of[r] is not None}
        assert len(adapters) <= cfg["max_loras"]
        for slot, key, _host_slot in out.loads:
            slots[slot] = key
        starts = [start for start, *_ in out.segments]
        assert starts == sorted(starts)
        assert sum(n for _, n, *_ in out.segments) == out.num_batched_tokens
        row = 0  # each request's tokens lie in a segment whose slot holds its adapter
        for rid, n in zip(out.request_ids, out.num_new_tokens):
            (slot,) = [sl for st, ln, sl, _ in out.segments if st <= row < st + ln]
            assert slot == -1 if key_of[rid] is None else slots[slot] == key_of[rid]
            row += n
        assert len(out.positions) == len(out.slot_mapping) == out.num_batched_tokens
    assert s.num_free_blocks == cfg["num_blocks"]
    assert {r for out in steps for r in out.request_ids} == set(range(len(reqs)))
