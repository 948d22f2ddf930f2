"""AsyncLLM, vLLM's asyncio engine: concurrent streams over many adapters give LLM.generate's
outputs; a cancelled consumer aborts its request; an idle engine takes no steps; deltas add
up to the final output and share no list with it."""

from __future__ import annotations

import asyncio
import time

import pytest

from loraplex import LLM, AsyncEngineArgs, RequestOutputKind, SamplingParams
from loraplex.v1.engine.async_llm import AsyncLLM
from tiny_adapters import lora_requests
from tiny_models import build_model

PROMPTS = ["a", "the quick brown fox", "SELECT name FROM users", "def add(a, b):", "zz", "héllo"]
ENGINE = dict(enable_lora=True, max_loras=4, max_cpu_loras=6, max_lora_rank=8)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("async-base"), "llama")


@pytest.fixture(scope="module")
def loras(base, tmp_path_factory):
    return lora_requests(base, tmp_path_factory.mktemp("async-adapters"), "a", 8, seed=40)


def new_engine(base, **kw) -> AsyncLLM:
    return AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(base), **{**ENGINE, **kw}))


def workload(loras, n=64):
    """n requests over the adapters (and the base model), greedy and seeded sampling mixed."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    params = [
        SamplingParams(temperature=0, max_tokens=3 + i % 5, ignore_eos=True)
        if i % 2
        else SamplingParams(temperature=0.9, seed=i, max_tokens=3 + i % 4, ignore_eos=True)
        for i in range(n)
    ]
    adapters = [loras[i % len(loras)] if i % 9 else None for i in range(n)]
    return prompts, params, adapters


async def collect(engine, prompt, params, request_id, lora=None):
    outs = []
    async for out in engine.generate(prompt, params, request_id, lora_request=lora):
        outs.append(out)
    return outs


def test_64_concurrent_streams_over_8_adapters_equal_llm_generate(base, loras):
    prompts, params, adapters = workload(loras)
    llm = LLM(model=str(base), **ENGINE)
    expected = llm.generate(prompts, params, lora_request=adapters, use_tqdm=False)

    async def main():
        engine = new_engine(base)
        try:
            return await asyncio.gather(
                *(
                    collect(engine, p, sp, f"r{i}", lora)
                    for i, (p, sp, lora) in enumerate(zip(prompts, params, adapters))
                )
            )
        finally:
            engine.shutdown()

    streams = asyncio.run(main())
    for i, (outs, want) in enumerate(zip(streams, expected)):
        final = outs[-1]
        assert final.finished and all(not o.finished for o in outs[:-1])
        assert final.request_id == f"r{i}" and final.lora_request == adapters[i]
        got = final.outputs[0]
        assert (got.token_ids, got.text) == (want.outputs[0].token_ids, want.outputs[0].text), i
        # cumulative outputs grow one token a step
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths) and lengths[-1] == len(got.token_ids)


def test_cancelling_a_consumer_aborts_its_request_and_frees_its_blocks(base, loras):
    async def main():
        engine = new_engine(base)
        core = engine.engine.scheduler
        try:
            long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            first = asyncio.Event()

            async def consume():
                async for _ in engine.generate("the quick", long, "doomed", lora_request=loras[0]):
                    first.set()

            task = asyncio.create_task(consume())
            await first.wait()  # it is running, holding blocks
            assert core.num_free_blocks < core.num_blocks
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # the abort was submitted before this request: by the time it ends, the core has
            # drained it
            short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
            outs = await collect(engine, "a", short, "after", loras[1])
            assert outs[-1].outputs[0].finish_reason == "length"
            assert not engine.engine.has_unfinished_requests()
            assert core.num_free_blocks == core.num_blocks
            assert (core.num_running, core.num_waiting) == (0, 0)
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_leaving_a_stream_early_aborts_the_request(base):
    async def main():
        engine = new_engine(base)
        try:
            long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            stream = engine.generate("the quick", long, "early")
            out = await stream.__anext__()
            assert not out.finished
            await stream.aclose()  # what leaving `async for` early does
            outs = await collect(engine, "a", SamplingParams(max_tokens=2), "next")
            assert outs[-1].finished
            assert not engine.engine.has_unfinished_requests()
            core = engine.engine.scheduler
            assert core.num_free_blocks == core.num_blocks
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_an_idle_engine_takes_no_steps(base):
    async def main():
        engine = new_engine(base)
        try:
            assert engine.num_steps == 0
            outs = await collect(engine, "a", SamplingParams(max_tokens=3, ignore_eos=True), "x")
            assert outs[-1].finished
            after = engine.num_steps
            assert after >= 3
            # a loop that spun while idle would take thousands of steps here; one that sleeps
            # takes none (the pause only gives a broken loop the chance to show itself)
            await asyncio.sleep(0.3)
            time.sleep(0.2)
            assert engine.num_steps == after
            await collect(engine, "b", SamplingParams(max_tokens=2, ignore_eos=True), "y")
            assert engine.num_steps > after  # and it wakes for new work
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_deltas_concatenate_to_the_final_output_and_share_no_list(base, loras):
    def params(kind):
        return SamplingParams(
            temperature=0.8, seed=3, max_tokens=8, ignore_eos=True, logprobs=2, output_kind=kind
        )

    async def main():
        engine = new_engine(base)
        try:
            deltas = await collect(
                engine, "the quick", params(RequestOutputKind.DELTA), "d", loras[2]
            )
            (final,) = await collect(
                engine, "the quick", params(RequestOutputKind.FINAL_ONLY), "f", loras[2]
            )
            cumulative = await collect(
                engine, "the quick", params(RequestOutputKind.CUMULATIVE), "c", loras[2]
            )
            return deltas, final, cumulative
        finally:
            engine.shutdown()

    deltas, final, cumulative = asyncio.run(main())
    want = final.outputs[0]
    assert len(deltas) > 1 and deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert [t for d in deltas for t in d.outputs[0].token_ids] == want.token_ids
    assert "".join(d.outputs[0].text for d in deltas) == want.text
    assert [lp for d in deltas for lp in d.outputs[0].logprobs] == want.logprobs
    assert all(len(d.outputs[0].token_ids) == 1 for d in deltas)  # only what is new
    assert cumulative[-1].outputs[0].token_ids == want.token_ids
    lists = [
        lst
        for out in [*deltas, final, *cumulative]
        for lst in (out.prompt_token_ids, out.outputs[0].token_ids, out.outputs[0].logprobs)
    ]
    assert len({id(x) for x in lists}) == len(lists)  # no two outputs share a list


def test_adapters_from_the_event_loop(base, loras):
    async def main():
        engine = new_engine(base)
        try:
            assert await engine.add_lora(loras[3]) is True
            assert await engine.list_loras() == {loras[3].lora_int_id}
            assert await engine.pin_lora(loras[3].lora_int_id) is True
            outs = await collect(engine, "a", SamplingParams(max_tokens=2), "p", loras[3])
            assert outs[-1].error is None
            assert await engine.remove_lora(loras[3].lora_int_id) is True
            assert await engine.list_loras() == set()
            with pytest.raises(ValueError, match="already running"):
                gen = engine.generate("a", SamplingParams(max_tokens=50), "dup")
                await gen.__anext__()
                await engine.generate("a", SamplingParams(), "dup").__anext__()
            await engine.abort("dup")
        finally:
            engine.shutdown()

    asyncio.run(main())
