"""Code written for vLLM runs by changing the import: the steps of vLLM's
``tests/lora/test_lora_functions.py``, ``tests/lora/test_llm_with_multi_loras.py`` (tp=1) and
``examples/offline_inference/multilora_inference.py``, against a local tiny model and PEFT
adapters; the seed's examples as written; EngineArgs, module paths, chat templates."""

from __future__ import annotations

import argparse
import json
import pickle

import pytest
import torch

from loraplex.engine.arg_utils import EngineArgs
from loraplex.lora.request import LoRARequest
from loraplex.v1.engine.llm_engine import LLMEngine
from tiny_adapters import PeftReference, build_adapter
from tiny_models import build_model, set_chat_template

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = build_model(tmp_path_factory.mktemp("compat-base"), "llama")
    return set_chat_template(folder, CHATML)


@pytest.fixture(scope="module")
def alice(base, tmp_path_factory):
    return build_adapter(base, tmp_path_factory.mktemp("alice") / "a", r=8, alpha=16, seed=11)


@pytest.fixture(scope="module")
def bob(base, tmp_path_factory):
    return build_adapter(base, tmp_path_factory.mktemp("bob") / "b", r=8, alpha=16, seed=12)


def test_lora_functions_sync(base, alice):
    """vLLM's test_lora_functions_sync, step for step: list_loras is the cache (LRU over
    max_cpu_loras = max_loras = 4), a pinned adapter is never evicted."""

    def make_lora_request(lora_id: int):
        return LoRARequest(lora_name=f"{lora_id}", lora_int_id=lora_id, lora_path=str(alice))

    engine_args = EngineArgs(
        model=str(base),
        enable_lora=True,
        max_loras=4,
        max_lora_rank=8,
        max_model_len=128,
        gpu_memory_utilization=0.8,
        enforce_eager=True,
    )
    llm = LLMEngine.from_engine_args(engine_args)

    def run_check(fn, args, expected: list):
        fn(args)
        assert set(llm.list_loras()) == set(expected)

    run_check(llm.add_lora, make_lora_request(1), [1])
    run_check(llm.add_lora, make_lora_request(2), [1, 2])
    run_check(llm.pin_lora, 1, [1, 2])
    run_check(llm.add_lora, make_lora_request(3), [1, 2, 3])
    run_check(llm.add_lora, make_lora_request(4), [1, 2, 3, 4])
    run_check(llm.add_lora, make_lora_request(5), [1, 5, 3, 4])
    run_check(llm.add_lora, make_lora_request(6), [1, 5, 6, 4])
    run_check(llm.add_lora, make_lora_request(7), [1, 5, 6, 7])
    run_check(llm.add_lora, make_lora_request(8), [1, 8, 6, 7])
    run_check(llm.add_lora, make_lora_request(9), [1, 8, 9, 7])
    run_check(llm.add_lora, make_lora_request(10), [1, 8, 9, 10])
    run_check(llm.remove_lora, 1, [8, 9, 10])
    run_check(llm.add_lora, make_lora_request(11), [8, 9, 10, 11])
    run_check(llm.add_lora, make_lora_request(12), [12, 9, 10, 11])
    run_check(llm.add_lora, make_lora_request(13), [12, 13, 10, 11])
    run_check(llm.remove_lora, 13, [12, 10, 11])
    run_check(llm.remove_lora, 12, [10, 11])
    run_check(llm.remove_lora, 11, [10])
    run_check(llm.remove_lora, 10, [])
    # keyword spellings, and identity kept across eviction: id 2 was evicted, not forgotten
    assert llm.remove_lora(lora_id=10) is False
    with pytest.raises(ValueError, match="id 2 is already taken"):
        llm.add_lora(LoRARequest("someone-else", 2, str(alice)))
    assert llm.add_lora(make_lora_request(2)) is True and llm.list_loras() == {2}
    assert llm.pin_lora(lora_id=2) is True


def test_multi_loras_with_tp_sync(base, alice, bob):
    """vLLM's test_multi_loras_with_tp_sync with tensor_parallel_size=1: adapters added as
    --lora-modules would, chat with each, reload one, the other's answers unchanged. The
    expected text is PEFT's greedy answer for the same rendered conversation."""
    from loraplex import LLM, SamplingParams

    paths = {"Alice": str(alice), "Bob": str(bob), "Cat": str(bob)}
    ids: dict[str, int] = {}
    llm = LLM(
        model=str(base),
        enable_lora=True,
        max_loras=2,
        max_lora_rank=8,
        max_model_len=512,
        gpu_memory_utilization=0.5,
        enforce_eager=True,
        tensor_parallel_size=1,
        max_cpu_loras=4,
    )

    def make_add_lora_request(name: str, path: str):
        ids.setdefault(name, len(ids) + 1)
        return LoRARequest(lora_name=name, lora_int_id=ids[name], lora_path=path)

    def run_check_lora(fn, args, expected: list):
        fn(args)
        assert set(llm.llm_engine.list_loras()) == set(expected)

    run_check_lora(llm.llm_engine.add_lora, make_add_lora_request("Alice", paths["Alice"]), [1])
    run_check_lora(llm.llm_engine.add_lora, make_add_lora_request("Bob", paths["Bob"]), [1, 2])
    run_check_lora(llm.llm_engine.add_lora, make_add_lora_request("Cat", paths["Cat"]), [1, 2, 3])
    sampling_params = SamplingParams(temperature=0, max_tokens=12)

    def messages(prompt: str):
        return [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ]

    def call(prompt: str, name: str):
        request = LoRARequest(lora_name=name, lora_int_id=ids[name], lora_path=paths[name])
        outputs = llm.chat(
            [messages(prompt)],
            sampling_params,
            chat_template_kwargs={"enable_thinking": False},
            lora_request=request,
            use_tqdm=False,
        )
        return outputs[0]

    def reload_lora(name: str):
        assert llm.llm_engine.remove_lora(lora_id=ids[name]) is True
        assert llm.llm_engine.add_lora(make_add_lora_request(name, paths[name])) is True

    peft = PeftReference(base, {"Alice": alice, "Bob": bob})
    for prompt in ["What is GitHub?", "Hi, tell me about you"]:
        first = call(prompt, "Alice")
        assert peft.mismatches([first], ["Alice"]) == []
        expected = first.outputs[0].text
        assert peft.mismatches([call(prompt, "Bob")], ["Bob"]) == []
        assert call(prompt, "Alice").outputs[0].text == expected
        reload_lora("Bob")
        assert call(prompt, "Alice").outputs[0].text == expected
        reload_lora("Alice")
        assert call(prompt, "Alice").outputs[0].text == expected


def test_multiple_lora_requests(base, alice):
    from loraplex import LLM

    llm = LLM(model=str(base), enable_lora=True, max_loras=4, max_lora_rank=8, max_model_len=512)
    prompts = ["Hello, my name is"] * 2
    lora_request = [LoRARequest("Alice" + str(i), i + 1, str(alice)) for i in range(2)]
    assert len(llm.generate(prompts, lora_request=lora_request)) == 2
    with pytest.raises(ValueError):
        llm.generate(prompts, lora_request=lora_request[:1])
    assert len(llm.generate(prompts, lora_request=lora_request[0])) == 2


def test_multilora_inference_example(base, alice):
    """vLLM's examples/offline_inference/multilora_inference.py: max_loras=1, two adapters
    over one path, logprobs and prompt_logprobs, sampling with top_k and presence_penalty,
    stop_token_ids; every request finishes, prompt logprobs have vLLM's shape and values."""
    from loraplex import RequestOutput, SamplingParams
    from tiny_models import hf_model

    engine = LLMEngine.from_engine_args(
        EngineArgs(
            model=str(base),
            enable_lora=True,
            max_loras=1,
            max_lora_rank=8,
            max_cpu_loras=2,
            max_num_seqs=256,
        )
    )
    query = "SELECT name FROM users WHERE id = 42;"
    greedy = SamplingParams(temperature=0.0, logprobs=1, prompt_logprobs=1, max_tokens=16)
    test_prompts = [
        ("the quick brown fox", greedy, None),
        (
            "a journey of",
            SamplingParams(temperature=0.8, top_k=5, presence_penalty=0.2, max_tokens=16),
            None,
        ),
        (query, with_stop_token(greedy, 7), None),
        (query, greedy, LoRARequest("sql-lora", 1, str(alice))),
        (query, greedy, LoRARequest("sql-lora2", 2, str(alice))),
    ]
    finished: dict[str, RequestOutput] = {}
    request_id = 0
    while test_prompts or engine.has_unfinished_requests():
        if test_prompts:
            prompt, sampling_params, lora_request = test_prompts.pop(0)
            engine.add_request(str(request_id), prompt, sampling_params, lora_request=lora_request)
            request_id += 1
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["0", "1", "2", "3", "4"]
    out = finished["0"]
    assert out.outputs[0].logprobs is not None and len(out.outputs[0].logprobs) == len(
        out.outputs[0].token_ids
    )
    plp = out.prompt_logprobs
    assert plp is not None and len(plp) == len(out.prompt_token_ids) and plp[0] is None
    with torch.no_grad():
        logits = hf_model(base)(torch.tensor([out.prompt_token_ids])).logits[0]
    ref = logits.float().log_softmax(-1)
    for pos in range(1, len(out.prompt_token_ids)):
        token = out.prompt_token_ids[pos]
        entry = plp[pos]
        assert token in entry and len(entry) <= 2  # the prompt token and the top-1
        assert abs(entry[token].logprob - ref[pos - 1, token].item()) < 1e-4
        assert entry[token].rank == int((ref[pos - 1] > ref[pos - 1, token]).sum()) + 1
    # the two adapters over one path give the same tokens
    assert finished["3"].outputs[0].token_ids == finished["4"].outputs[0].token_ids
    assert engine.scheduler.num_free_blocks == engine.scheduler.num_blocks


def with_stop_token(params, token: int):
    params = params.clone()
    params.stop_token_ids = [token]
    return params


def test_seed_examples_as_written(base, alice):
    """DESIGN.md's examples, exactly as written there."""
    from loraplex import LLM, SamplingParams

    sql = LoRARequest("sql-lora", 1, str(alice))
    code = LoRARequest("code-lora", 2, str(alice))
    llm = LLM(model=str(base), enable_lora=True, max_loras=4, max_lora_rank=64)
    prompts = ["SELECT", "hello", "def f("]
    outs = llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=64), lora_request=[sql, None, code]
    )
    assert outs[0].outputs[0].text is not None and outs[0].lora_request == sql
    assert outs[1].lora_request is None

    engine = LLMEngine.from_engine_args(EngineArgs(model=str(base), enable_lora=True, max_loras=2))
    engine.add_request(
        request_id="req-1",
        prompt="prompt",
        sampling_params=SamplingParams(max_tokens=32),
        lora_request=sql,
    )
    done = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done.append(out)
    assert [o.request_id for o in done] == ["req-1"] and done[0].lora_request == sql


def test_engine_args_every_vllm_name(base):
    from loraplex.engine.vllm_args import INERT, REFUSED

    args = EngineArgs(model=str(base), **{name: default for name, (default, _) in INERT.items()})
    args.verify()
    EngineArgs(model=str(base), gpu_memory_utilization=0.3, enforce_eager=True).verify()
    for name, (default, _) in REFUSED.items():
        EngineArgs(model=str(base), **{name: default}).verify()  # vLLM's default: fine
    with pytest.raises(ValueError, match="tensor_parallel_size=2 is not supported") as info:
        EngineArgs(model=str(base), tensor_parallel_size=2).verify()
    assert REFUSED["tensor_parallel_size"][1] in str(info.value)
    with pytest.raises(ValueError, match="quantization='awq'"):
        EngineArgs(model=str(base), quantization="awq").verify()
    with pytest.raises(TypeError, match="'max_lora'.*did you mean 'max_loras'"):
        EngineArgs(model=str(base), max_lora=2)
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        EngineArgs(model=str(base), gpu_memory_utilization=1.5).verify()


def test_engine_args_cli_round_trip(base):
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    ns = parser.parse_args(
        [
            "--model",
            str(base),
            "--enable-lora",
            "--max-loras",
            "3",
            "--max-cpu-loras",
            "5",
            "--dtype",
            "bfloat16",
            "--seed",
            "None",
        ]
    )
    args = EngineArgs.from_cli_args(ns)
    assert (args.enable_lora, args.max_loras, args.max_cpu_loras) == (True, 3, 5)
    assert args.dtype == "bfloat16" and args.seed is None and args.max_num_seqs == 256


def test_seed_none_and_vllm_module_paths(base):
    from loraplex import LLM, SamplingParams
    from loraplex.inputs import TextPrompt, TokensPrompt
    from loraplex.logprobs import Logprob
    from loraplex.outputs import CompletionOutput, RequestOutput
    from loraplex.sampling_params import RequestOutputKind

    assert Logprob and CompletionOutput and RequestOutput and TextPrompt
    llm = LLM(model=str(base), seed=None)
    params = SamplingParams(temperature=0, max_tokens=3, output_kind=RequestOutputKind.DELTA)
    out = llm.generate(TokensPrompt(prompt_token_ids=[0, 5, 6]), params, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3 and out.prompt_token_ids == [0, 5, 6]
    assert params.output_kind == RequestOutputKind.DELTA  # the caller's params untouched
    clone = params.clone()
    assert clone == params and clone is not params


def test_model_config_as_vllm_gives_it(base):
    """``llm.llm_engine.model_config`` (and ``llm.model_config``, the async engine's): the
    engine's max_model_len and model, and vLLM's accessors, read against config.json."""
    import asyncio

    from loraplex import LLM, AsyncEngineArgs, AsyncLLM

    hf = json.loads((base / "config.json").read_text())
    llm = LLM(model=str(base), max_model_len=48)
    mc = llm.llm_engine.model_config
    assert mc is llm.model_config is llm.llm_engine.get_model_config()
    assert (mc.max_model_len, mc.model) == (48, str(base))
    assert mc.get_vocab_size() == hf["vocab_size"]
    assert mc.get_hidden_size() == hf["hidden_size"]
    assert mc.get_num_layers(None) == hf["num_hidden_layers"]
    assert mc.get_num_attention_heads(None) == hf["num_attention_heads"]
    assert mc.get_num_kv_heads(None) == mc.get_total_num_kv_heads() == hf["num_key_value_heads"]
    assert mc.get_head_size() == hf["hidden_size"] // hf["num_attention_heads"]
    assert mc.hf_config.model_type == hf["model_type"]
    # without max_model_len: the model's max_position_embeddings, as vLLM derives it
    default = LLM(model=str(base)).llm_engine.model_config
    assert default.max_model_len == hf["max_position_embeddings"]

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(base), max_model_len=40))
    try:
        assert engine.model_config.max_model_len == 40
        assert asyncio.run(engine.get_model_config()).max_model_len == 40
    finally:
        engine.shutdown()


def test_default_sampling_params_are_what_generate_uses(base):
    from loraplex import LLM, SamplingParams

    llm = LLM(model=str(base), max_model_len=64)
    default = llm.get_default_sampling_params()
    assert isinstance(default, SamplingParams)
    assert (default.temperature, default.top_p, default.top_k, default.max_tokens) == (
        1.0,
        1.0,
        0,
        16,
    )  # vLLM's SamplingParams defaults
    default.max_tokens = 2  # a fresh copy each call: changing it changes nothing after
    assert llm.get_default_sampling_params().max_tokens == 16
    out = llm.generate("a", use_tqdm=False)[0].outputs[0]  # no params: the defaults
    assert len(out.token_ids) == 16 or out.finish_reason == "stop"
    assert len(llm.generate("a", default, use_tqdm=False)[0].outputs[0].token_ids) <= 2


def test_lora_request_load_inplace_field():
    req = LoRARequest("x", 3, "/a", load_inplace=True)
    assert req.load_inplace is True and "load_inplace=True" in repr(req)
    assert pickle.loads(pickle.dumps(req)).load_inplace is True
    assert LoRARequest("x", 3, "/a").load_inplace is False


def running_on_alice_then_bob_on_disk(engine, alice, bob, tmp_path):
    """Request 'before' running on alice's weights at a path where bob's now lie:
    ``(its LoRARequest, its params, the path)``."""
    import shutil

    from loraplex import SamplingParams

    live = tmp_path / "live"
    shutil.copytree(alice, live)
    req = LoRARequest("policy", 1, str(live))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("before", "the quick", params, lora_request=req)
    engine.step()  # 'before' is running on alice's weights
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(bob / name, live / name)
    return req, params, live


def test_load_inplace_hot_swaps_weights(base, alice, bob, tmp_path):
    """The RL loop's hot swap: new weights at the same path, reloaded in place. A request
    running before the reload finishes on the old weights; new ones use the new weights."""
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=str(base), enable_lora=True, max_loras=2, max_lora_rank=8)
    )
    req, params, live = running_on_alice_then_bob_on_disk(engine, alice, bob, tmp_path)
    assert engine.add_lora(LoRARequest("policy", 1, str(live), load_inplace=True)) is True
    engine.add_request("after", "the quick", params, lora_request=req)
    done = {}
    while engine.has_unfinished_requests():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    peft = PeftReference(base, {"alice": alice, "bob": bob})
    assert peft.mismatches([done["before"]], ["alice"]) == []
    assert peft.mismatches([done["after"]], ["bob"]) == []
    assert engine.list_loras() == {1}
    assert engine.scheduler.num_free_blocks == engine.scheduler.num_blocks


@pytest.mark.parametrize("via", ["add_request", "generate"])
def test_a_request_carrying_load_inplace_reloads_before_it_runs(base, alice, bob, tmp_path, via):
    """vLLM's per-request ``load_inplace``: a request carrying it reloads the adapter's
    weights before it runs (no ``add_lora``); one running already finishes on the old ones;
    a later request without the flag keeps the new weights."""

    from loraplex import LLM

    llm = LLM(model=str(base), enable_lora=True, max_loras=2, max_lora_rank=8)
    engine = llm.llm_engine
    req, params, live = running_on_alice_then_bob_on_disk(engine, alice, bob, tmp_path)
    swap = LoRARequest("policy", 1, str(live), load_inplace=True)
    done = {}
    if via == "add_request":
        engine.add_request("after", "the quick", params, lora_request=swap)
        while engine.has_unfinished_requests():
            done |= {o.request_id: o for o in engine.step() if o.finished}
    else:
        while engine.has_unfinished_requests():
            done |= {o.request_id: o for o in engine.step() if o.finished}
        (done["after"],) = llm.generate(["the quick"], params, lora_request=swap, use_tqdm=False)
    (done["later"],) = llm.generate(["the quick"], params, lora_request=req, use_tqdm=False)
    peft = PeftReference(base, {"alice": alice, "bob": bob})
    assert peft.mismatches([done["before"]], ["alice"]) == []
    assert peft.mismatches([done["after"], done["later"]], ["bob", "bob"]) == []
    assert engine.list_loras() == {1}


@pytest.mark.parametrize("source", ["tokenizer_config", "jinja_file", "argument"])
@pytest.mark.parametrize("mode", ["generation_prompt", "plain", "continue"])
def test_chat_template_equals_transformers(base, tmp_path, source, mode):
    """The rendering equals transformers' apply_chat_template on the same folder, and
    LLM.chat equals generate on transformers' token ids."""
    import shutil

    from transformers import AutoTokenizer

    from loraplex import LLM, SamplingParams
    from loraplex.inputs import TokensPrompt

    folder = tmp_path / "m"
    shutil.copytree(base, folder)
    template = (
        CHATML + "{{ bos_token if false }}{% for t in tools or [] %}{{ t | tojson }}{% endfor %}"
    )
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if source == "tokenizer_config":
        config["chat_template"] = template
    elif source == "jinja_file":
        (folder / "chat_template.jinja").write_text(template)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    conversation = [
        {"role": "system", "content": "héllo <b>&</b> 🙂"},
        {"role": "user", "content": "SELECT name"},
        {"role": "assistant", "content": "def add(a, b): "},
    ]
    kwargs = {
        "generation_prompt": dict(add_generation_prompt=True),
        "plain": dict(add_generation_prompt=False),
        "continue": dict(add_generation_prompt=False, continue_final_message=True),
    }[mode]
    extra = {"chat_template": template} if source == "argument" else {}
    hf = AutoTokenizer.from_pretrained(folder)
    want_text = hf.apply_chat_template(conversation, tokenize=False, **kwargs, **extra)
    want_ids = hf.apply_chat_template(conversation, tokenize=True, **kwargs, **extra)
    if not isinstance(want_ids, list):
        want_ids = want_ids["input_ids"]
    llm = LLM(model=str(folder))
    ours = llm.get_tokenizer()
    assert ours.apply_chat_template(conversation, tokenize=False, **kwargs, **extra) == want_text
    assert ours.apply_chat_template(conversation, **kwargs, **extra) == list(want_ids)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    chat = llm.chat(conversation, params, use_tqdm=False, **kwargs, **extra)[0]
    gen = llm.generate(TokensPrompt(prompt_token_ids=list(want_ids)), params, use_tqdm=False)[0]
    assert chat.prompt_token_ids == gen.prompt_token_ids
    assert chat.outputs[0].token_ids == gen.outputs[0].token_ids


def test_chat_refuses_what_cannot_render(base):
    from loraplex import LLM

    llm = LLM(model=str(base))
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="not compatible"):
        llm.chat(msgs, continue_final_message=True, use_tqdm=False)
    with pytest.raises(Exception, match="boom"):
        llm.chat(msgs, chat_template="{{ raise_exception('boom') }}", use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_outputs_share_no_list_and_carry_metrics(base):
    from loraplex import SamplingParams
    from loraplex.sampling_params import RequestOutputKind

    engine = LLMEngine.from_engine_args(EngineArgs(model=str(base)))
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2)
    engine.add_request("cum", "the quick", params)
    delta = params.clone()
    delta.output_kind = RequestOutputKind.DELTA
    engine.add_request("delta", "the quick", delta)
    seen: dict[str, list] = {"cum": [], "delta": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
            out.prompt_token_ids.append(-1)  # vandalise: nothing later may see it
            out.outputs[0].token_ids.append(-1)
            if out.outputs[0].logprobs is not None:
                out.outputs[0].logprobs.append({})
    final = seen["cum"][-1]
    assert final.prompt_token_ids[:-1] == seen["cum"][0].prompt_token_ids[:-1]
    assert final.prompt_token_ids.count(-1) == 1
    tokens = final.outputs[0].token_ids[:-1]
    assert len(tokens) == 5 and -1 not in tokens
    pieces = [t for o in seen["delta"] for t in o.outputs[0].token_ids if t != -1]
    assert pieces == tokens
    text = "".join(o.outputs[0].text for o in seen["delta"])
    assert text == final.outputs[0].text
    m = final.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time
    assert m.finished_time >= m.last_token_time and m.time_in_queue >= 0
    assert m.model_forward_time > 0 and final.num_cached_tokens == 0
