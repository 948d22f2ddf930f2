"""The engine's surface from many threads while another steps: hypothesis chooses, for each
of 4 threads, a list of submissions, aborts and adapter calls (add, remove, pin) and the step
each waits for; they run on their own threads, truly concurrently with the step in flight.
Every request ends exactly once; the ones not aborted and not failed by an adapter's removal
get exactly the tokens they get alone; every KV block and adapter slot comes back; and the run
finishes within a bound of steps."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex import (
    AdapterInUseError,
    EngineArgs,
    LLMEngine,
    NoFreeSlotError,
    SamplingParams,
    UnknownAdapterError,
)
from tiny_adapters import lora_requests
from tiny_models import build_model

PROMPTS = ["a", "the quick brown fox", "SELECT name FROM users"]
GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
ENGINE = dict(enable_lora=True, max_loras=2, max_cpu_loras=3, max_lora_rank=8)
MAX_STEPS = 600
MAX_IDLE = 100_000
IDS = itertools.count()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("conc-base"), "llama")


@pytest.fixture(scope="module")
def loras(base, tmp_path_factory):
    return lora_requests(base, tmp_path_factory.mktemp("conc-adapters"), "c", 4, seed=60)


def new_engine(base) -> LLMEngine:
    return LLMEngine.from_engine_args(EngineArgs(model=str(base), **ENGINE))


@pytest.fixture(scope="module")
def alone(base, loras):
    """Tokens of each (prompt, adapter) run by itself."""
    engine = new_engine(base)
    tokens = {}
    for p, a in itertools.product(range(len(PROMPTS)), [None, *range(len(loras))]):
        engine.add_request("x", PROMPTS[p], GREEDY, lora_request=None if a is None else loras[a])
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[(p, a)] = out.outputs[0].token_ids
    return tokens


adapter = st.none() | st.integers(0, 3)
op = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, len(PROMPTS) - 1), adapter),
    st.tuples(st.just("abort")),
    st.tuples(st.just("add_lora"), st.integers(0, 3)),
    st.tuples(st.just("remove_lora"), st.integers(0, 3)),
    st.tuples(st.just("pin_lora"), st.just(0)),  # one pinnable: others keep a slot
)
timed_op = st.tuples(st.integers(0, 10), op)  # (the step it waits for, the op)
plans = st.lists(st.lists(timed_op, max_size=6), min_size=4, max_size=4)


class Clock:
    """Steps taken, for threads that wait for one."""

    def __init__(self):
        self.steps = 0
        self.cond = threading.Condition()

    def tick(self):
        with self.cond:
            self.steps += 1
            self.cond.notify_all()

    def wait_for(self, step):
        with self.cond:
            self.cond.wait_for(lambda: self.steps >= step)


def worker(engine, loras, clock, ops, submitted, aborted, errors):
    last = None
    for at, (kind, *args) in sorted(ops, key=lambda o: o[0]):
        clock.wait_for(at)
        try:
            if kind == "submit":
                p, a = args
                rid = f"r{next(IDS)}"
                lora = None if a is None else loras[a]
                submitted[rid] = (p, a)  # before the call: the loop may report it at once
                try:
                    engine.add_request(rid, PROMPTS[p], GREEDY, lora_request=lora)
                except UnknownAdapterError:  # removed by another thread as it was read:
                    del submitted[rid]  # refused to this caller, so never submitted
                    raise
                last = rid
            elif kind == "abort" and last is not None:
                aborted.add(last)
                engine.abort_request(last)
            elif kind == "add_lora":
                engine.add_lora(loras[args[0]])
            elif kind == "remove_lora":
                engine.remove_lora(loras[args[0]].lora_int_id)
            elif kind == "pin_lora":
                engine.pin_lora(loras[args[0]].lora_int_id)
        except (AdapterInUseError, NoFreeSlotError, UnknownAdapterError):
            pass  # refusals the surface documents (pinning one not added is one)
        except Exception as e:  # anything else fails the test
            errors.append(f"{kind}{tuple(args)}: {type(e).__name__}: {e}")


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plans)
def test_four_threads_and_a_stepping_loop(base, loras, alone, plans):
    engine = new_engine(base)
    clock = Clock()
    submitted: dict[str, tuple] = {}
    aborted: set[str] = set()
    errors: list[str] = []
    threads = [
        threading.Thread(
            target=worker, args=(engine, loras, clock, ops, submitted, aborted, errors)
        )
        for ops in plans
    ]
    for t in threads:
        t.start()
    ended: dict[str, list] = {}
    busy_steps = idle_steps = 0
    core = engine.scheduler
    while any(t.is_alive() for t in threads) or engine.has_unfinished_requests():
        # a step with work to do: the core holds a request. One that another thread is still
        # adding is registered in the engine before the core has it, and steps taken meanwhile
        # (hundreds, if the OS leaves that thread waiting) have nothing to do: idle ones
        busy = engine.has_unfinished_requests() and (
            core.num_running + core.num_waiting + core.num_loading > 0
        )
        for out in engine.step():
            if out.finished:
                ended.setdefault(out.request_id, []).append(out)
        clock.tick()
        if busy:  # the bound: steps with work to do (idle ones only pace the threads)
            busy_steps += 1
            assert busy_steps < MAX_STEPS, "no progress: a livelock or a lost request"
        else:
            idle_steps += 1
            assert idle_steps < MAX_IDLE, "a thread is stuck in a call, or a request was lost"
            time.sleep(0.001)  # yields to the threads; no outcome depends on it
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(ended) == sorted(submitted)  # every request ended ...
    assert all(len(outs) == 1 for outs in ended.values())  # ... exactly once
    for rid, (out,) in ended.items():
        completion = out.outputs[0]
        if completion.finish_reason == "length":
            assert out.error is None
            assert completion.token_ids == alone[submitted[rid]], rid
        else:  # aborted by its thread, or its adapter was removed before it was scheduled
            assert completion.finish_reason == "abort"
            assert rid in aborted or "removed" in (out.error or ""), (rid, out.error)
    assert core.num_free_blocks == core.num_blocks
    assert (core.num_running, core.num_waiting, core.num_loading) == (0, 0, 0)
    for lora in loras:  # nothing holds an adapter: every one can go, and every slot with it
        engine.remove_lora(lora.lora_int_id)
    assert engine.list_loras() == set()
