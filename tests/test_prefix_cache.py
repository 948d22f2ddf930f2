"""The prefix cache (issue 28): keyed by the tokens and the weights version (adapter key, or
the base), so outputs are those of the engine without it, over hypothesis-chosen workloads
of shared prefixes, adapters, preemptions and aborts, every KV block coming back; two
adapters, or an adapter and the base, never share a block; after an in-place reload, or a
remove and a re-add, no block of the old weights is used; prompt logprobs are computed, not
found; ``reset_prefix_cache`` forgets; the counters reach vLLM's metrics."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex import LLM, LoRARequest, SamplingParams
from tiny_adapters import build_adapter
from tiny_models import build_model

BLOCK = 4
PREFIXES = [
    "the quick brown fox jumps over the lazy dog and runs",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY",
    "def add(a, b):\n    return a + b\n\ndef mul(a, b):",
]
SUFFIXES = ["", " away", " home again", " then more and more words", " zz"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("prefix-base"), "llama")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-adapters")
    return [build_adapter(base, root / f"a{i}", r=8, alpha=16, seed=60 + i) for i in range(3)]


def engine(base, cache: bool, **kw) -> LLM:
    args = dict(enable_lora=True, max_lora_rank=8, max_loras=2, max_cpu_loras=3)
    args.update(block_size=BLOCK, max_model_len=128, max_num_seqs=6, seed=0)
    args.update(kw)
    return LLM(model=str(base), enable_prefix_caching=cache, **args)


@pytest.fixture(scope="module")
def pair(base):
    """The same small engine with and without the cache: few KV blocks, so batches preempt,
    and a 12-token step budget, so prompts are prefilled in chunks (after a hit too)."""
    small = dict(num_gpu_blocks_override=32, max_num_batched_tokens=12)
    return engine(base, True, **small), engine(base, False, **small)


def lora(adapters, i):
    return None if i == 0 else LoRARequest(f"a{i}", i, str(adapters[i - 1]))


request = st.tuples(
    st.integers(0, len(PREFIXES) - 1),
    st.integers(0, len(SUFFIXES) - 1),
    st.integers(0, 2),  # the base, a1, a2
    st.sampled_from([None, 3, 11]),  # greedy, or sampling with a seed
    st.integers(1, 2),  # n
)


def run(llm, adapters, batch):
    prompts, params, loras = [], [], []
    for prefix, suffix, which, seed, n in batch:
        prompts.append(PREFIXES[prefix] + SUFFIXES[suffix])
        temperature = 0.0 if seed is None else 0.9
        params.append(
            SamplingParams(max_tokens=6, temperature=temperature, seed=seed, n=n, ignore_eos=True)
        )
        loras.append(lora(adapters, which))
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    return [[list(c.token_ids) for c in o.outputs] for o in outs], outs


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=st.lists(st.lists(request, min_size=1, max_size=6), min_size=1, max_size=3))
def test_outputs_are_the_same_with_the_cache_on_and_off(pair, adapters, batches):
    """Each batch in turn on both engines (the cached one keeps what earlier batches and
    examples left): the same tokens, greedy and seeded; every block back after each."""
    cached, plain = pair
    for batch in batches:
        got, outs = run(cached, adapters, batch)
        want, _ = run(plain, adapters, batch)
        assert got == want
        for o in outs:
            assert 0 <= o.num_cached_tokens < len(o.prompt_token_ids)
            assert o.num_cached_tokens % BLOCK == 0
        for llm in pair:
            core = llm.llm_engine.scheduler
            assert core.num_free_blocks == llm.llm_engine.num_kv_blocks  # every block back


def test_the_workloads_do_hit_and_preempt(pair, adapters):
    """What the property tests rely on: repeated prefixes are found, and this engine's few
    blocks preempt a batch of prompts that share nothing, with the cache on too."""
    cached, plain = pair
    batch = [(0, s, 0, None, 1) for s in range(5)] + [(1, s, 1, 3, 2) for s in range(5)]
    run(cached, adapters, batch)  # warms the cache
    got, outs = run(cached, adapters, batch)
    assert got == run(plain, adapters, batch)[0]
    assert all(o.num_cached_tokens > 0 for o in outs)
    apart = [(p, 3, a, None, 1) for p in range(3) for a in range(2)]  # no two share a block
    before = cached.llm_engine.num_preemptions
    assert run_with_aborts(cached, adapters, apart, set(), -1) == run_with_aborts(
        plain, adapters, apart, set(), -1
    )
    assert cached.llm_engine.num_preemptions > before


def run_with_aborts(llm, adapters, batch, aborted, after):
    """``batch`` through the engine, the requests in ``aborted`` aborted after ``after``
    steps; the others' tokens by index."""
    core = llm.llm_engine
    for i, (prefix, suffix, which, seed, n) in enumerate(batch):
        temperature = 0.0 if seed is None else 0.9
        params = SamplingParams(
            max_tokens=8, temperature=temperature, seed=seed, n=n, ignore_eos=True
        )
        core.add_request(
            f"r{i}", PREFIXES[prefix] + SUFFIXES[suffix], params, lora_request=lora(adapters, which)
        )
    done = {}
    steps = 0
    while core.has_unfinished_requests():
        if steps == after:
            core.abort_request([f"r{i}" for i in aborted])
        for out in core.step():
            if out.finished:
                done[int(out.request_id[1:])] = [list(c.token_ids) for c in out.outputs]
        steps += 1
    return {i: toks for i, toks in done.items() if i not in aborted}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batch=st.lists(request, min_size=2, max_size=6),
    aborted=st.sets(st.integers(0, 5), max_size=3),
    after=st.integers(0, 6),
)
def test_aborts_leave_the_others_outputs_and_every_block(pair, adapters, batch, aborted, after):
    """Requests aborted mid-way (prefilling, decoding, or holding shared blocks): every other
    request's tokens are the uncached engine's, and every block comes back."""
    cached, plain = pair
    aborted = {i for i in aborted if i < len(batch)}
    got = run_with_aborts(cached, adapters, batch, aborted, after)
    want = run_with_aborts(plain, adapters, batch, aborted, after)
    assert got.keys() == want.keys() == set(range(len(batch))) - aborted
    assert got == want
    for llm in pair:
        assert llm.llm_engine.scheduler.num_free_blocks == llm.llm_engine.num_kv_blocks


def test_aborted_requests_give_their_blocks_back(pair, adapters):
    cached, _ = pair
    core = cached.llm_engine
    for i in range(6):
        core.add_request(
            f"abort-{i}",
            PREFIXES[i % 3] + " and so on",
            SamplingParams(max_tokens=50),
            lora_request=lora(adapters, i % 3),
        )
    for _ in range(3):
        core.step()
    core.abort_request([f"abort-{i}" for i in range(6)])
    while core.has_unfinished_requests():
        core.step()
    assert core.scheduler.num_free_blocks == core.num_kv_blocks


def test_the_base_and_two_adapters_never_share_a_block(base, adapters):
    """The same prompt under the base, a1 and a2: none finds another's blocks (each first
    request finds nothing), each repeat finds its own, and every output is the uncached
    engine's."""
    llm, plain = engine(base, True), engine(base, False)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompt = PREFIXES[0] + SUFFIXES[3]
    for repeat in range(2):
        for i in range(3):
            out = llm.generate(prompt, params, lora_request=lora(adapters, i), use_tqdm=False)[0]
            want = plain.generate(prompt, params, lora_request=lora(adapters, i), use_tqdm=False)
            assert out.outputs[0].token_ids == want[0].outputs[0].token_ids
            if repeat == 0:
                assert out.num_cached_tokens == 0, (i, out.num_cached_tokens)
            else:
                assert out.num_cached_tokens > 0
    by = llm.llm_engine.prefix_by_adapter
    assert set(by) == {"", "a1", "a2"} and all(hits > 0 for _, hits in by.values())


def test_an_in_place_reload_and_a_re_add_use_no_block_of_the_old_weights(base, adapters, tmp_path):
    """An adapter's folder rewritten with other weights: after ``load_inplace`` the same
    prompt finds nothing and answers as a fresh engine on the new weights; the same after
    ``remove_lora`` and a re-add under another id."""
    folder = tmp_path / "live"
    shutil.copytree(adapters[0], folder)
    llm = engine(base, True)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompt = PREFIXES[1] + SUFFIXES[2]

    def ask(request):
        return llm.generate(prompt, params, lora_request=request, use_tqdm=False)[0]

    def fresh(path):
        other = engine(base, False)
        out = other.generate(
            prompt, params, lora_request=LoRARequest("x", 1, str(path)), use_tqdm=False
        )
        return out[0].outputs[0].token_ids

    ask(LoRARequest("live", 1, str(folder)))
    assert ask(LoRARequest("live", 1, str(folder))).num_cached_tokens > 0
    shutil.rmtree(folder)
    shutil.copytree(adapters[1], folder)
    out = ask(LoRARequest("live", 1, str(folder), load_inplace=True))
    assert out.num_cached_tokens == 0
    assert out.outputs[0].token_ids == fresh(adapters[1])
    assert ask(LoRARequest("live", 1, str(folder))).num_cached_tokens > 0  # the new weights'

    assert llm.llm_engine.remove_lora(1)
    shutil.rmtree(folder)
    shutil.copytree(adapters[2], folder)
    out = ask(LoRARequest("live", 7, str(folder)))
    assert out.num_cached_tokens == 0
    assert out.outputs[0].token_ids == fresh(adapters[2])


def test_prompt_logprobs_are_computed_not_found_and_reset_forgets(base):
    llm, plain = engine(base, True), engine(base, False)
    prompt = PREFIXES[2] + SUFFIXES[1]
    greedy = SamplingParams(max_tokens=3, temperature=0)
    assert llm.generate(prompt, greedy, use_tqdm=False)[0].num_cached_tokens == 0
    assert llm.generate(prompt, greedy, use_tqdm=False)[0].num_cached_tokens > 0
    wants = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2)
    out = llm.generate(prompt, wants, use_tqdm=False)[0]
    ref = plain.generate(prompt, wants, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for got, want in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
        assert got.keys() == want.keys()
        for t in got:
            assert got[t].logprob == pytest.approx(want[t].logprob, abs=1e-5)
    assert llm.reset_prefix_cache()
    assert llm.llm_engine.scheduler.num_cached_blocks == 0
    assert llm.generate(prompt, greedy, use_tqdm=False)[0].num_cached_tokens == 0


def test_the_cache_off_finds_nothing_and_the_counters_reach_the_metrics(base):
    from prometheus_client.parser import text_string_to_metric_families

    from loraplex.entrypoints.openai.metrics import Metrics

    plain = engine(base, False)
    params = SamplingParams(max_tokens=2, temperature=0)
    for _ in range(2):
        assert plain.generate(PREFIXES[0], params, use_tqdm=False)[0].num_cached_tokens == 0
    assert plain.llm_engine.prefix_queries == 0
    llm = engine(base, True)
    for _ in range(2):
        llm.generate(PREFIXES[0], params, use_tqdm=False)
    metrics = Metrics("tiny", 128)
    metrics.stats = {None: llm.llm_engine.get_stats()}
    text = metrics.render()[0].decode()
    samples = {
        (s.name, s.labels.get("adapter")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    n = len(llm.get_tokenizer().encode(PREFIXES[0]))
    assert samples[("vllm:prefix_cache_queries_total", None)] == 2 * n
    hits = samples[("vllm:prefix_cache_hits_total", None)]
    assert hits == llm.llm_engine.prefix_hits > 0
    assert samples[("loraplex:lora_prefix_cache_hits_total", "tiny")] == hits


def test_a_cache_salt_keeps_tenants_apart(base):
    """vLLM's ``cache_salt``: only requests with the same salt share cached prefixes; an
    empty or non-string salt is refused before anything is queued."""
    llm = engine(base, True)
    params = SamplingParams(max_tokens=2, temperature=0)
    text = PREFIXES[0] + SUFFIXES[4]

    def cached(salt):
        prompt = {"prompt": text} if salt is None else {"prompt": text, "cache_salt": salt}
        return llm.generate(prompt, params, use_tqdm=False)[0].num_cached_tokens

    assert [cached("a"), cached("b"), cached(None)] == [0, 0, 0]
    assert cached("a") > 0 and cached("b") > 0 and cached(None) > 0
    for bad in ("", 7):
        with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
            llm.llm_engine.add_request("bad-salt", {"prompt": text, "cache_salt": bad}, params)
    assert not llm.llm_engine.has_unfinished_requests()
