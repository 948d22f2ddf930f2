"""Multi-LoRA serving against PEFT: every greedy token is PEFT's argmax for that request's
adapter and prefix, whatever else shares the batch."""

from __future__ import annotations

import shutil

import pytest
import torch

from loraplex import LLM, EngineArgs, LLMEngine, LoRARequest, SamplingParams
from tiny_adapters import PeftReference, build_adapter, edit_weights
from tiny_models import build_model

PROMPTS = ["a", "the quick brown fox", "SELECT name FROM users", "héllo 🙂", "def add(a, b):", "zz"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("lora-base"), "llama")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "sql": build_adapter(base, root / "sql", r=8, alpha=16, seed=1),
        "code": build_adapter(
            base, root / "code", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=2, use_rslora=True
        ),
        "chat": build_adapter(
            base,
            root / "chat",
            r=16,
            alpha=32,
            targets=["o_proj", "gate_proj", "up_proj", "down_proj"],
            seed=3,
            rank_pattern={"down_proj": 8},
            alpha_pattern={"o_proj": 4},
        ),
        "noise": build_adapter(base, root / "noise", r=8, alpha=64, seed=4, std=1.0),
    }


@pytest.fixture(scope="module")
def reqs(adapters):
    return {
        name: LoRARequest(name, i, str(path))
        for i, (name, path) in enumerate(adapters.items(), start=1)
    }


@pytest.fixture(scope="module")
def peft(base, adapters):
    return PeftReference(base, adapters)


def generate(llm, prompts, loras, params=GREEDY):
    return llm.generate(prompts, params, lora_request=loras, use_tqdm=False)


def test_one_adapter_for_all_prompts(base, reqs, peft):
    llm = LLM(model=str(base), enable_lora=True, max_loras=2, max_lora_rank=16)
    outs = generate(llm, PROMPTS, reqs["sql"])
    assert all(o.lora_request == reqs["sql"] for o in outs)
    assert peft.mismatches(outs, ["sql"] * len(PROMPTS)) == []


def test_one_adapter_per_prompt_mixed_with_base(base, reqs, peft, kernels):
    llm = LLM(model=str(base), enable_lora=True, max_loras=4, max_lora_rank=16)
    names = ["sql", None, "code", "chat", None, "sql"]
    outs = generate(llm, PROMPTS, [reqs[n] if n else None for n in names])
    assert [o.lora_request for o in outs] == [reqs[n] if n else None for n in names]
    assert peft.mismatches(outs, names) == []


def test_more_adapters_than_slots_evicts_and_reloads(base, reqs, peft, kernels):
    # one device slot, one host slot: every switch evicts, and reloads come from disk
    llm = LLM(model=str(base), enable_lora=True, max_loras=1, max_cpu_loras=1, max_lora_rank=16)
    names = ["sql", "code", "chat", "sql", None, "code"]
    outs = generate(llm, PROMPTS, [reqs[n] if n else None for n in names])
    assert peft.mismatches(outs, names) == []


def test_isolation(base, reqs, peft):
    llm = LLM(model=str(base), enable_lora=True, max_loras=3, max_lora_rank=16)
    names = ["sql", "code", None]
    alone = generate(llm, PROMPTS[:3], [reqs[n] if n else None for n in names])
    # the same requests beside a random-weight adapter in the same batch
    mixed = generate(
        llm,
        PROMPTS[:3] + PROMPTS[:3],
        [reqs[n] if n else None for n in names] + [reqs["noise"]] * 3,
    )
    assert [o.outputs[0].token_ids for o in mixed[:3]] == [o.outputs[0].token_ids for o in alone]
    # after others ran, and after remove + re-add
    engine = llm.llm_engine
    assert engine.remove_lora(reqs["sql"].lora_int_id) is True
    assert reqs["sql"].lora_int_id not in engine.list_loras()
    again = generate(llm, PROMPTS[:3], [reqs[n] if n else None for n in names])
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in alone]
    assert peft.mismatches(again, names) == []


def test_add_remove_pin_list(base, reqs):
    from loraplex import AdapterInUseError, NoFreeSlotError

    engine = LLMEngine.from_engine_args(
        EngineArgs(model=str(base), enable_lora=True, max_loras=2, max_lora_rank=16)
    )
    sql, code, chat = reqs["sql"], reqs["code"], reqs["chat"]
    assert engine.add_lora(sql) is True and engine.add_lora(sql) is False
    assert engine.add_lora(code) is True
    assert engine.list_loras() == {sql.lora_int_id, code.lora_int_id}
    assert engine.pin_lora(sql.lora_int_id) and engine.pin_lora(code.lora_int_id)
    engine.add_lora(chat)
    with pytest.raises(NoFreeSlotError):
        engine.pin_lora(chat.lora_int_id)
    # both slots pinned: chat's request could never run, so it ends at once with the reason;
    # sql's runs
    engine.add_request("c", "a", GREEDY, lora_request=chat)
    engine.add_request("s", "a", GREEDY, lora_request=sql)
    out = {o.request_id: o for o in engine.step()}
    assert sorted(out) == ["c", "s"] and out["c"].finished and not out["s"].finished
    assert out["c"].outputs[0].finish_reason == "abort"
    assert (
        "no free adapter slot" in out["c"].error and f"adapter {chat.lora_int_id}" in out["c"].error
    )
    with pytest.raises(AdapterInUseError):
        engine.remove_lora(sql.lora_int_id)
    assert engine.remove_lora(code.lora_int_id) is True  # frees a pinned slot at once
    engine.add_request("c2", "a", GREEDY, lora_request=chat)  # now it has a slot to use
    done = set()
    while engine.has_unfinished_requests():
        done |= {o.request_id for o in engine.step() if o.finished and o.error is None}
    assert done == {"c2", "s"}
    assert engine.remove_lora(12345) is False


def test_preemption_with_adapters(base, reqs, peft):
    llm = LLM(
        model=str(base),
        enable_lora=True,
        max_loras=2,
        max_lora_rank=16,
        block_size=4,
        num_gpu_blocks_override=16,
        max_model_len=64,
    )
    names = ["sql", "code", None, "sql", "code", None]
    outs = generate(
        llm,
        PROMPTS,
        [reqs[n] if n else None for n in names],
        SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
    )
    assert llm.llm_engine.num_preemptions > 0
    assert peft.mismatches(outs, names) == []


def test_design_md_examples(base, reqs):
    sql, code = reqs["sql"], reqs["code"]
    llm = LLM(model=str(base), enable_lora=True, max_loras=4, max_lora_rank=64)
    outs = llm.generate(
        ["p1", "p2", "p3"],
        SamplingParams(temperature=0.0, max_tokens=64),
        lora_request=[sql, None, code],
        use_tqdm=False,
    )
    assert isinstance(outs[0].outputs[0].text, str)
    assert (
        outs[0].lora_request == sql
        and outs[1].lora_request is None
        and outs[2].lora_request == code
    )
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(base), enable_lora=True, max_loras=2))
    engine.add_request(
        "req-1",
        "prompt",
        SamplingParams(max_tokens=32),
        lora_request=LoRARequest("sql-lora", 9, sql.lora_path),
    )
    finished = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished.append(out)
    assert [o.request_id for o in finished] == ["req-1"]
    assert finished[0].lora_request.lora_name == "sql-lora"


def test_lora_request_without_enable_lora(base, reqs):
    llm = LLM(model=str(base))
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        llm.generate("a", lora_request=reqs["sql"], use_tqdm=False)
    assert llm.generate("a", GREEDY, use_tqdm=False)[0].finished


def test_conflicting_ids_are_refused(base, reqs):
    from loraplex import AdapterConflictError

    llm = LLM(model=str(base), enable_lora=True, max_loras=2, max_lora_rank=16)
    generate(llm, ["a"], reqs["sql"])
    clash = LoRARequest("other", reqs["sql"].lora_int_id, reqs["code"].lora_path)
    with pytest.raises(AdapterConflictError, match="'sql'"):
        generate(llm, ["a"], clash)


def test_negative_control_routing_mistakes_are_caught(base, reqs, peft):
    """The oracle can tell adapters apart: checked against another adapter's (or the base
    model's) logits, the same outputs fail."""
    llm = LLM(model=str(base), enable_lora=True, max_loras=2, max_lora_rank=16)
    outs = generate(llm, PROMPTS, reqs["sql"])
    assert peft.mismatches(outs, ["code"] * len(PROMPTS)) != []
    assert peft.mismatches(outs, [None] * len(PROMPTS)) != []
    base_outs = generate(llm, PROMPTS, None)
    assert [o.outputs[0].token_ids for o in outs] != [o.outputs[0].token_ids for o in base_outs]


@pytest.mark.parametrize("lora_dtype", ["bfloat16", "float16"])
def test_lora_dtype_keeps_16_bit_weights_and_matches_peft_on_them(
    base, adapters, reqs, kernels, tmp_path, lora_dtype
):
    """lora_dtype on a float32 model: the slots hold the adapters in 16 bits, the products
    stay float32, so every greedy token is PEFT's (float32) on the same weights rounded to
    16 bits. (sql and noise scale by powers of two: rounding before or after scaling agree.)"""
    dtype = getattr(torch, lora_dtype)
    rounded = {}
    for name in ("sql", "noise"):
        rounded[name] = tmp_path / name
        shutil.copytree(adapters[name], rounded[name])
        edit_weights(
            rounded[name], lambda t: t.update({k: v.to(dtype).float() for k, v in t.items()})
        )
    llm = LLM(
        model=str(base), enable_lora=True, max_loras=2, max_lora_rank=16, lora_dtype=lora_dtype
    )
    names = ["sql", None, "noise", "sql", "noise", None]
    outs = generate(llm, PROMPTS, [reqs[n] if n else None for n in names])
    assert PeftReference(base, rounded).mismatches(outs, names) == []
    slots = llm.llm_engine.lora.host
    assert {t.dtype for t in [*slots.a.values(), *slots.bt.values()]} == {dtype}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lora_dtype="int8"), "lora_dtype='int8' is not supported with dtype torch.float32"),
        (dict(dtype="bfloat16", lora_dtype="float16"), "with dtype torch.bfloat16"),
        (dict(dtype="float16", lora_dtype="float32"), "with dtype torch.float16"),
    ],
)
def test_lora_dtype_refuses_what_it_cannot_serve(base, kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(model=str(base), enable_lora=True, **kwargs).verify()


def test_lora_dtype_float16_refuses_weights_beyond_its_range(base, adapters, tmp_path):
    big = tmp_path / "big"
    shutil.copytree(adapters["sql"], big)
    edit_weights(big, lambda t: t.update({k: v * 1e6 for k, v in t.items() if "lora_B" in k}))
    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=16, lora_dtype="float16")
    with pytest.raises(ValueError, match=r"'big'.*beyond torch.float16's range"):
        llm.llm_engine.add_lora(LoRARequest("big", 7, str(big)))
    out = generate(llm, ["a"], None)[0]  # serves on
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
