"""``scheduling_policy="fair"`` (issue 29), counted in steps, never in time: a flood for one
adapter queued before a few requests for four others; under ``fair`` the light requests all
finish within a number of steps that does not grow with the flood (200 and 400 requests),
under ``fcfs`` they wait behind it; greedy outputs are those of each request run alone."""

from __future__ import annotations

import math

import pytest

from loraplex import LLM, LoRARequest, SamplingParams
from tiny_adapters import build_adapter
from tiny_models import build_model

NAMES = "ABCDE"
SEATS = 8
GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("fair-base"), "llama")


@pytest.fixture(scope="module")
def loras(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("fair-adapters")
    return [
        LoRARequest(n, i + 1, str(build_adapter(base, root / n, r=8, alpha=16, seed=70 + i)))
        for i, n in enumerate(NAMES)
    ]


def engine(base, loras, policy, **kw):
    llm = LLM(
        model=str(base),
        enable_lora=True,
        max_lora_rank=8,
        max_loras=5,
        max_cpu_loras=5,
        max_num_seqs=SEATS,
        scheduling_policy=policy,
        enable_prefix_caching=False,
        **kw,
    )
    for lora in loras:
        llm.llm_engine.add_lora(lora)  # read before the count starts
    return llm


def prompt(i: int) -> str:
    return f"request number {i} says hello"


def flood(llm, loras, heavy: int) -> tuple[int, dict[str, list[int]]]:
    """``heavy`` requests for A, then 5 for each of B-E, all queued before the first step;
    the step at which the last light request finished, and every light request's tokens."""
    core = llm.llm_engine
    for i in range(heavy):
        core.add_request(f"A-{i}", prompt(i), GREEDY, lora_request=loras[0])
    light = {}
    for lora in loras[1:]:
        for j in range(5):
            rid = f"{lora.lora_name}-{j}"
            core.add_request(rid, prompt(j), GREEDY, lora_request=lora)
            light[rid] = None
    return run_to_end(core, light), light


def run_to_end(core, light: dict[str, list[int] | None]) -> int:
    """Steps ``core`` until nothing is left, filling in ``light``'s tokens; the step at
    which the last of ``light`` finished."""
    step = last = 0
    while core.has_unfinished_requests():
        step += 1
        for out in core.step():
            if out.finished and out.request_id in light:
                light[out.request_id] = list(out.outputs[0].token_ids)
                last = step
    return last


def test_light_clients_finish_in_bounded_steps_under_fair_and_wait_under_fcfs(base, loras):
    alone = engine(base, loras, "fcfs")
    want = {}
    for lora in loras[1:]:
        for j in range(5):
            out = alone.generate(prompt(j), GREEDY, lora_request=lora, use_tqdm=False)[0]
            want[f"{lora.lora_name}-{j}"] = list(out.outputs[0].token_ids)
    fair = engine(base, loras, "fair")
    steps = {}
    for heavy in (200, 400):
        steps[heavy], got = flood(fair, loras, heavy)
        assert got == want
    fcfs = engine(base, loras, "fcfs")
    fcfs_steps, got = flood(fcfs, loras, 200)
    assert got == want
    # 20 light requests of 4 steps each (a prefill that samples, then 3 decodes); the five
    # clients' requests cost the same, so the four light ones get 4/5 of the 8 seats:
    # 20 * 4 / (8 * 4/5) = 12.5 steps, plus a request's 4 steps of ramp at each end
    bound = math.ceil(20 * 4 / (SEATS * 4 / 5)) + 2 * 4
    assert steps[200] <= bound and steps[400] <= bound, steps
    assert fcfs_steps > 200 * 4 // SEATS, fcfs_steps  # behind every A request's 4 steps


def test_weights_shares_and_the_metrics(base, loras):
    """A client of weight 3 gets three times the service of one of weight 1 while both are
    backlogged; each client's service reaches /metrics; bad weights are refused."""
    from prometheus_client.parser import text_string_to_metric_families

    from loraplex.entrypoints.openai.metrics import Metrics

    llm = engine(base, loras[:2], "fair", fair_share_weights={"B": 3, 1: 1.0})
    core = llm.llm_engine
    for i in range(60):
        for lora in loras[:2]:
            core.add_request(f"{lora.lora_name}-{i}", prompt(i), GREEDY, lora_request=lora)
    seen: dict[str, int] = {}
    tokens = {"A": 0, "B": 0}
    for step in range(40):  # both stay backlogged throughout (60 requests each)
        for out in core.step():
            new = len(out.outputs[0].token_ids) - seen.get(out.request_id, 0)
            seen[out.request_id] = len(out.outputs[0].token_ids)
            if step >= 10:  # past the first admissions
                tokens[out.request_id[0]] += new
    assert tokens["B"] / tokens["A"] == pytest.approx(3, rel=0.25), tokens
    # the counters are service over weight: equal, while B got three times A's tokens
    a, b = core.scheduler.client_service(1), core.scheduler.client_service(2)
    assert b == pytest.approx(a, rel=0.1) and a > 0, (a, b)
    metrics = Metrics("tiny", 128)
    metrics.stats = {None: core.get_stats()}  # (after the run above)
    samples = {
        s.labels["adapter"]: s.value
        for f in text_string_to_metric_families(metrics.render()[0].decode())
        for s in f.samples
        if s.name == "loraplex:fair_share_service"
    }
    assert samples["A"] > 0 and samples["B"] > 0 and samples["tiny"] == 0
    core.abort_request([f"{n}-{i}" for n in "AB" for i in range(60)])
    while core.has_unfinished_requests():
        core.step()
    for bad in (0, -1, "x"):
        with pytest.raises(ValueError, match="fair_share_weights"):
            LLM(model=str(base), scheduling_policy="fair", fair_share_weights={"A": bad})


def tenant_flood(llm, lora, heavy: int) -> tuple[int, dict[str, list[int]]]:
    """``heavy`` requests of tenant "big" for adapter A, then 5 for each of tenants t1-t4 on
    the same adapter, all queued before the first step; the step at which the last light
    request finished, and every light request's tokens."""
    core = llm.llm_engine
    for i in range(heavy):
        core.add_request(f"big-{i}", prompt(i), GREEDY, lora_request=lora, tenant="big")
    light = {}
    for t in ("t1", "t2", "t3", "t4"):
        for j in range(5):
            core.add_request(f"{t}-{j}", prompt(j), GREEDY, lora_request=lora, tenant=t)
            light[f"{t}-{j}"] = None
    return run_to_end(core, light), light


def test_tenants_on_one_adapter_share_it_fairly(base, loras):
    """Clients named by requests: a tenant's flood on one adapter does not hold back four
    other tenants on the same adapter under ``fair`` (steps bounded as above, at 200 and
    400), does under ``fcfs`` (where a tenant changes nothing); outputs as run alone."""
    a = loras[0]
    alone = engine(base, loras[:1], "fcfs")
    want = {
        f"{t}-{j}": list(
            alone.generate(prompt(j), GREEDY, lora_request=a, use_tqdm=False)[0]
            .outputs[0]
            .token_ids
        )
        for t in ("t1", "t2", "t3", "t4")
        for j in range(5)
    }
    fair = engine(base, loras[:1], "fair")
    steps = {}
    for heavy in (200, 400):
        steps[heavy], got = tenant_flood(fair, a, heavy)
        assert got == want
    fcfs_steps, got = tenant_flood(engine(base, loras[:1], "fcfs"), a, 200)
    assert got == want
    bound = math.ceil(20 * 4 / (SEATS * 4 / 5)) + 2 * 4  # as for adapters above
    assert steps[200] <= bound and steps[400] <= bound, steps
    assert fcfs_steps > 200 * 4 // SEATS, fcfs_steps
    # every tenant's requests ended: the core forgets them as the others pass them by
    assert all(backlog == 0 for _, _, backlog in fair.llm_engine.scheduler.tenant_service())


def test_tenant_weights_by_name_generate_argument_and_bad_tenants(base, loras):
    """A tenant of weight 3 gets three times the service of one of weight 1 over two shared
    adapters; ``LLM.generate(tenant=...)`` takes one or one per prompt; a bad tenant is
    refused naming it, and the engine serves on."""
    from prometheus_client.parser import text_string_to_metric_families

    from loraplex.entrypoints.openai.metrics import Metrics

    llm = engine(base, loras[:2], "fair", fair_share_weights={"gold": 3})
    core = llm.llm_engine
    for i in range(60):
        for t in ("gold", "std"):
            lora = loras[i % 2]  # each tenant over both adapters
            core.add_request(f"{t}-{i}", prompt(i), GREEDY, lora_request=lora, tenant=t)
    seen: dict[str, int] = {}
    tokens = {"gold": 0, "std": 0}
    for step in range(40):
        for out in core.step():
            new = len(out.outputs[0].token_ids) - seen.get(out.request_id, 0)
            seen[out.request_id] = len(out.outputs[0].token_ids)
            if step >= 10:
                tokens[out.request_id.split("-")[0]] += new
    assert tokens["gold"] / tokens["std"] == pytest.approx(3, rel=0.25), tokens
    shares = {name: service for name, service, _ in core.scheduler.tenant_service()}
    assert shares["gold"] == pytest.approx(shares["std"], rel=0.1) and shares["std"] > 0
    metrics = Metrics("tiny", 128)
    metrics.stats = {None: core.get_stats()}
    samples = {
        s.labels["tenant"]: s.value
        for f in text_string_to_metric_families(metrics.render()[0].decode())
        for s in f.samples
        if s.name == "loraplex:tenant_fair_share_service"
    }
    assert samples.keys() == {"gold", "std"} and min(samples.values()) > 0, samples
    core.abort_request([f"{t}-{i}" for t in ("gold", "std") for i in range(60)])
    while core.has_unfinished_requests():
        core.step()
    for bad in ("", "x" * 257, 7):
        with pytest.raises(ValueError, match="tenant"):
            core.add_request("bad", prompt(0), GREEDY, tenant=bad)
    with pytest.raises(ValueError, match="tenant has 1 entries for 2 prompts"):
        llm.generate([prompt(0), prompt(1)], GREEDY, use_tqdm=False, tenant=["a"])
    outs = llm.generate([prompt(0), prompt(1)], GREEDY, use_tqdm=False, tenant=["a", None])
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
    one = llm.generate(prompt(0), GREEDY, use_tqdm=False, tenant="a")[0]
    assert one.outputs[0].token_ids == outs[0].outputs[0].token_ids
