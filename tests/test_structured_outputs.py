"""Structured outputs in the engine: with random tiny models (whatever the weights, the mask
guarantees the form), every output that finishes with ``stop`` validates against its JSON
schema (``jsonschema``, an independent validator), matches its regex (Python's ``re``) or is
one of its choices, in batches that mix constrained and free requests over different
adapters; free requests' tokens equal the same requests run alone; a dead end ends only its
own request; a spec that does not compile is an error at submission naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex import LLM, SamplingParams
from loraplex.sampler import Sampler, SampleRow
from loraplex.sampling_params import StructuredOutputsParams as SO
from tiny_adapters import lora_requests
from tiny_models import build_model

PROMPTS = ["the quick brown", "hello world", "a b c d", "once upon"]
FREE = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("so")
    base = build_model(root / "base", "llama")
    adapters = lora_requests(base, root, "ad", 2, seed=5)
    llm = LLM(model=str(base), enable_lora=True, max_loras=2, max_lora_rank=16, max_num_seqs=16)
    alone = {}  # each free request run alone: the reference its batched tokens must equal
    for i, lora in enumerate([None, *adapters]):
        prompt = PROMPTS[i % len(PROMPTS)]
        out = llm.generate(prompt, FREE, lora_request=lora, use_tqdm=False)
        alone[i] = out[0].outputs[0].token_ids
    return llm, adapters, alone


field_schema = st.one_of(
    st.just({"type": "string", "maxLength": 10}),
    st.just({"type": "string"}),
    st.just({"type": "integer"}),
    st.lists(
        st.sampled_from(["red", "green", "blue", "x y", 'q"t']), min_size=1, max_size=4, unique=True
    ).map(lambda values: {"enum": values}),
    st.just({"type": "array", "items": {"type": "integer"}, "maxItems": 3}),
    st.just({"type": "array", "items": {"type": "string", "maxLength": 4}}),
)
object_schema = st.dictionaries(
    st.text("abcdefghij_", min_size=1, max_size=6), field_schema, min_size=1, max_size=4
).map(
    lambda props: {
        "type": "object",
        "properties": props,
        "required": sorted(props),
        "additionalProperties": False,
    }
)
REGEXES = [
    r"[a-z]{2,6}-[0-9]{1,3}",
    r"(yes|no|maybe)!?",
    r"[0-9]+\.[0-9][0-9]",
    r"[A-Z][a-z]* [a-z]+",
]
choices = st.lists(
    st.text('abc xyz"\\\n', min_size=1, max_size=8), min_size=1, max_size=4, unique=True
)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    schema=object_schema, regex=st.sampled_from(REGEXES), choice=choices, seed=st.integers(0, 2**16)
)
def test_outputs_match_their_constraints_in_a_mixed_batch(setup, schema, regex, choice, seed):
    llm, adapters, alone = setup
    loras = [None, *adapters]
    jobs = []  # (params, lora, check)
    for k in range(3):  # the same schema under each adapter, sampled
        so = SO(json=schema, disable_any_whitespace=k != 2)  # one with vLLM's default spacing
        p = SamplingParams(max_tokens=160, temperature=1.0, seed=seed + k, structured_outputs=so)
        jobs.append((p, loras[k], ("json", schema)))
    for k in range(2):
        p = SamplingParams(
            max_tokens=40, temperature=1.0, seed=seed + 7 + k, structured_outputs=SO(regex=regex)
        )
        jobs.append((p, loras[k + 1], ("regex", regex)))
    p = SamplingParams(
        max_tokens=40, temperature=0.8, seed=seed, structured_outputs=SO(choice=choice)
    )
    jobs.append((p, loras[2], ("choice", choice)))
    for i, lora in enumerate(loras):  # the free ones, greedy: their tokens are known
        jobs.append((FREE, lora, ("free", i)))
    prompts = [
        PROMPTS[i % len(PROMPTS)] if j[2][0] == "free" else PROMPTS[i % 3]
        for i, j in enumerate(jobs)
    ]
    prompts[-3:] = [PROMPTS[i % len(PROMPTS)] for i in range(3)]
    outs = llm.generate(
        prompts, [j[0] for j in jobs], lora_request=[j[1] for j in jobs], use_tqdm=False
    )
    for out, (_, _, (kind, spec)) in zip(outs, jobs):
        c = out.outputs[0]
        if kind == "free":
            assert c.token_ids == alone[spec], f"free request {spec} changed in a mixed batch"
            continue
        assert c.finish_reason in ("stop", "length"), (c.finish_reason, out.error)
        if kind == "choice":  # a finite language: it always reaches its end
            assert c.finish_reason == "stop"
        if c.finish_reason == "stop":
            check(kind, spec, c.text)


def check(kind: str, spec, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), spec)
    elif kind == "regex":
        assert re.fullmatch(spec, text), (spec, text)
    else:
        assert text in spec, (spec, text)


def test_most_bounded_documents_finish_and_all_of_those_validate(setup):
    """The property above checks the outputs that stop; here enough of them do: a schema
    whose every field is bounded, sampled under 8 seeds and both adapters."""
    llm, adapters, _ = setup
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "size": {"enum": ["S", "M", "L"]},
            "tags": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
            "n": {"type": "integer"},
        },
        "required": ["name", "size", "tags", "n"],
        "additionalProperties": False,
    }
    so = SO(json=schema, disable_any_whitespace=True)
    params = [SamplingParams(max_tokens=200, seed=s, structured_outputs=so) for s in range(8)]
    outs = llm.generate(
        ["hello"] * 8, params, lora_request=[adapters[s % 2] for s in range(8)], use_tqdm=False
    )
    stopped = [o.outputs[0].text for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(stopped) >= 5, [o.outputs[0].text for o in outs]
    for text in stopped:
        check("json", schema, text)


def test_grammars_lark_and_gbnf_and_json_object(setup):
    llm, _, _ = setup
    specs = [
        SO(grammar='start: "ab" NUM "!"\nNUM: /[0-9]+/'),
        SO(grammar='root ::= "ab" [0-9]+ "!"'),
    ]
    params = [
        SamplingParams(max_tokens=60, seed=i, structured_outputs=s) for i, s in enumerate(specs)
    ]
    params += [
        SamplingParams(
            max_tokens=200,
            seed=s,
            structured_outputs=SO(json_object=True, disable_any_whitespace=True),
        )
        for s in range(3)
    ]
    outs = llm.generate(["x"] * len(params), params, use_tqdm=False)
    for out in outs[:2]:
        c = out.outputs[0]
        assert c.finish_reason == "length" or re.fullmatch(r"ab[0-9]+!", c.text), c.text
    assert any(o.outputs[0].finish_reason == "stop" for o in outs[:2])
    for out in outs[2:]:
        c = out.outputs[0]
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict), c.text


def test_a_choice_ends_at_the_grammars_end_even_with_ignore_eos(setup):
    llm, _, _ = setup
    p = SamplingParams(
        max_tokens=50, ignore_eos=True, structured_outputs=SO(choice=["alpha", "beta"])
    )
    out = llm.generate("hello", p, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text in ("alpha", "beta")


def test_n_sequences_each_follow_the_grammar(setup):
    llm, adapters, _ = setup
    schema = {
        "type": "object",
        "properties": {"a": {"enum": ["x", "y"]}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    }
    p = SamplingParams(
        n=4, max_tokens=80, seed=3, structured_outputs=SO(json=schema, disable_any_whitespace=True)
    )
    out = llm.generate("hello", p, lora_request=adapters[0], use_tqdm=False)[0]
    assert len(out.outputs) == 4
    for c in out.outputs:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
    assert sum(c.finish_reason == "stop" for c in out.outputs) >= 2


@pytest.mark.parametrize(
    "so, field",
    [
        (SO(json={"type": "nonsense"}), "json"),
        (SO(json="{not json"), "json"),
        (SO(json='["an array is not a schema"]'), "json"),
        (SO(regex="a(b"), "regex"),
        (SO(grammar="start: undefined_rule"), "grammar"),
        (SO(grammar="root ::= [unclosed"), "grammar"),
        (SO(structural_tag='{"type": "structural_tag"}'), "structural_tag"),
    ],
)
def test_a_spec_that_does_not_compile_is_an_error_at_submission(setup, so, field):
    llm, _, _ = setup
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=rf"SamplingParams\.structured_outputs\.{field}\b"):
        engine.add_request("bad", "hello", SamplingParams(structured_outputs=so))
    assert not engine.has_unfinished_requests()  # nothing was queued
    out = llm.generate("hello", SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_a_dead_end_aborts_only_its_request_and_frees_its_blocks(setup):
    llm, adapters, _ = setup
    engine = llm.llm_engine
    free_before = engine.get_stats()["kv_free_blocks"]
    tok = llm.get_tokenizer()
    # the grammar wants "yes"; allowed_token_ids leaves only tokens that cannot begin it
    never = [t for t in range(3, 40) if not tok.decode([t]).startswith(("y", "ye", "yes"))][:5]
    dead = SamplingParams(
        max_tokens=20, allowed_token_ids=never, structured_outputs=SO(choice=["yes"])
    )
    ok = SamplingParams(max_tokens=30, seed=1, structured_outputs=SO(regex=r"[a-c]{3}"))
    outs = llm.generate(
        ["hello", "hello", "the quick brown"],
        [dead, ok, FREE],
        lora_request=[adapters[0], adapters[0], None],
        use_tqdm=False,
    )
    assert outs[0].outputs[0].finish_reason == "abort"
    assert outs[0].outputs[0].token_ids == []
    assert "structured_outputs (choice) reached a dead end" in outs[0].error
    assert outs[0].request_id in outs[0].error
    assert outs[1].outputs[0].finish_reason == "stop" and re.fullmatch(
        "[a-c]{3}", outs[1].outputs[0].text
    )
    assert outs[2].outputs[0].finish_reason == "length" and outs[2].error is None
    assert engine.get_stats()["kv_free_blocks"] == free_before


def test_preemption_keeps_the_matcher_in_step(tmp_path):
    """Preemption recomputes the KV of the tokens kept: the matcher, which has consumed
    exactly those tokens, goes on from where it was."""
    llm = LLM(
        model=str(build_model(tmp_path, "llama")),
        block_size=4,
        num_gpu_blocks_override=24,
        max_model_len=96,
    )
    schema = {
        "type": "object",
        "properties": {"k": {"type": "array", "items": {"type": "integer"}}},
        "required": ["k"],
    }
    params = [
        SamplingParams(
            max_tokens=60, seed=s, structured_outputs=SO(json=schema, disable_any_whitespace=True)
        )
        for s in range(6)
    ]
    outs = llm.generate(["the quick brown fox"] * 6, params, use_tqdm=False)
    assert llm.llm_engine.num_preemptions > 0
    for out in outs:
        c = out.outputs[0]
        assert c.finish_reason in ("stop", "length"), out.error
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)


def test_each_distinct_spec_compiles_once_and_the_cache_is_bounded(setup):
    llm, _, _ = setup
    grammars = llm.llm_engine.grammars
    p = SamplingParams(max_tokens=5, structured_outputs=SO(regex=r"[0-9]{4}z"))
    before = grammars.compiles
    llm.generate(["a", "b", "c"], p, use_tqdm=False)
    assert grammars.compiles == before + 1
    size = grammars.cache_size
    grammars.cache_size = 2
    try:
        for i in range(4):
            q = SamplingParams(max_tokens=2, structured_outputs=SO(regex=f"q{i}[0-9]+"))
            llm.generate("a", q, use_tqdm=False)
        assert len(grammars._cache) == 2
    finally:
        grammars.cache_size = size


def test_the_mask_comes_before_bias_and_top_k():
    """Sampler-level: a disallowed token stays out whatever its bias, and top-k counts only
    allowed tokens (the reference: the argmax over the allowed tokens alone)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    allowed = torch.zeros(3, 50, dtype=torch.bool)
    allowed[:, [4, 9, 17]] = True
    best = logits[0].masked_fill(~allowed[0], -float("inf")).argmax()
    params = [
        SamplingParams(temperature=0, logit_bias={int(logits[0].argmax()): 100.0}),
        SamplingParams(temperature=1.0, top_k=1, seed=1),
        SamplingParams(temperature=1.0, top_p=0.01, seed=1),
    ]
    rows = [SampleRow(p, [1], [], None, []) for p in params]
    for i, row in enumerate(rows):
        row.banned = ~allowed[i]
    out = Sampler(0)(logits, rows)
    if int(logits[0].argmax()) not in (4, 9, 17):
        assert out.token_ids[0] == int(best)
    for i in (1, 2):
        assert out.token_ids[i] == int(logits[i].masked_fill(~allowed[i], -float("inf")).argmax())
    assert not out.no_token


def test_a_row_left_without_tokens_is_reported():
    logits = torch.randn(2, 20)
    rows = [SampleRow(SamplingParams(temperature=1.0), [1], [], None, []) for _ in range(2)]
    rows[0].banned = torch.ones(20, dtype=torch.bool)
    out = Sampler(0)(logits, rows)
    assert out.no_token == {0}
    assert 0 <= out.token_ids[1] < 20


def test_async_llm_streams_a_constrained_request_beside_free_ones(setup, tmp_path):
    """AsyncLLM compiles off the event loop (a bad spec raises to the caller, the loop
    serves on) and streams constrained and free requests together."""
    import asyncio

    from loraplex.engine.arg_utils import AsyncEngineArgs
    from loraplex.v1.engine.async_llm import AsyncLLM

    llm, _, _ = setup
    model = llm.llm_engine.args.model

    async def run(engine, prompt, params, rid):
        return [out async for out in engine.generate(prompt, params, rid)][-1]

    async def main():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model))
        try:
            with pytest.raises(ValueError, match=r"structured_outputs\.regex does not compile"):
                await run(engine, "a", SamplingParams(structured_outputs=SO(regex="(")), "bad")
            so = SO(choice=["red", "green"])
            return await asyncio.gather(
                run(engine, "a", SamplingParams(max_tokens=20, structured_outputs=so), "c"),
                run(engine, "the quick brown", FREE, "free"),
            )
        finally:
            engine.shutdown()

    constrained, free = asyncio.run(main())
    assert constrained.outputs[0].text in ("red", "green")
    assert constrained.outputs[0].finish_reason == "stop"
    assert len(free.outputs[0].token_ids) == 12


def test_engine_wide_options_from_structured_outputs_config(tmp_path):
    """vLLM's ``structured_outputs_config``: the backend named (llguidance's names only)
    and ``disable_any_whitespace`` for every request."""
    base = build_model(tmp_path, "llama")
    with pytest.raises(ValueError, match="backend 'xgrammar' is not supported"):
        LLM(model=str(base), structured_outputs_config={"backend": "xgrammar"})
    with pytest.raises(ValueError, match=r"structured_outputs_config\.reasoning_parser"):
        LLM(model=str(base), structured_outputs_config={"reasoning_parser": "deepseek_r1"})
    schema = {"type": "object", "properties": {"k": {"type": "array", "items": {"enum": [1, 2]}}}}
    params = [
        SamplingParams(max_tokens=120, seed=s, structured_outputs=SO(json=schema)) for s in range(6)
    ]

    def spaced(**kw) -> int:
        llm = LLM(model=str(base), **kw)
        outs = llm.generate(["hello"] * 6, params, use_tqdm=False)
        return sum(any(ch in o.outputs[0].text for ch in " \t\n\r") for o in outs)

    assert spaced() > 0  # vLLM's default: any whitespace between tokens
    assert (
        spaced(structured_outputs_config='{"backend": "guidance", "disable_any_whitespace": true}')
        == 0
    )
    assert spaced(guided_decoding_disable_any_whitespace=True) == 0
