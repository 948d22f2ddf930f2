"""The vLLM surface: LLM.generate, LLMEngine, SamplingParams, outputs, errors."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loraplex import LLM, EngineArgs, LLMEngine, LoRARequest, RequestOutput, SamplingParams
from tiny_models import build_model, hf_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("gen"), "llama")


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(model=str(folder))


def test_truncate_prompt_tokens_keeps_the_prompts_end(folder):
    """vLLM's ``SamplingParams.truncate_prompt_tokens``: the prompt's last k tokens (-1: as
    many as the context holds); the output is the one for those tokens alone."""
    from transformers import AutoTokenizer

    llm = LLM(model=str(folder), max_model_len=24)
    ids = AutoTokenizer.from_pretrained(folder)("the quick brown fox " * 6)["input_ids"]
    assert len(ids) > 24
    greedy = dict(temperature=0, max_tokens=4, ignore_eos=True)
    for keep, want in ((5, ids[-5:]), (-1, ids[-24:])):
        cut = SamplingParams(truncate_prompt_tokens=keep, **greedy)
        out = llm.generate({"prompt_token_ids": ids}, cut, use_tqdm=False)[0]
        alone = llm.generate({"prompt_token_ids": want}, SamplingParams(**greedy))[0]
        assert out.prompt_token_ids == want
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
    text = llm.generate("the quick brown fox " * 6, SamplingParams(truncate_prompt_tokens=3))
    assert text[0].prompt_token_ids == ids[-3:]
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)


def test_prompts_that_are_no_prompt_are_refused_naming_them(llm):
    for bad in (None, 42, (p for p in ["a"])):
        with pytest.raises(TypeError, match="prompts must be"):
            llm.generate(bad, SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.generate(("a",), SamplingParams(max_tokens=2), use_tqdm=False)[0].prompt == "a"


def test_issue_example_on_a_fresh_folder(folder):
    outs = LLM(model=str(folder)).generate(
        ["a", "bb"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
    )
    assert [o.prompt for o in outs] == ["a", "bb"]
    assert all(isinstance(o, RequestOutput) and o.finished for o in outs)
    for o in outs:
        c = o.outputs[0]
        assert 1 <= len(c.token_ids) <= 8
        assert c.finish_reason in ("stop", "length")
        assert o.lora_request is None and c.index == 0


def test_outputs_follow_input_order_and_fields(llm):
    prompts = ["x" * k for k in (5, 1, 3)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert [o.prompt for o in outs] == prompts
    tok = llm.get_tokenizer()
    for o in outs:
        assert o.prompt_token_ids == tok.encode(o.prompt)
        c = o.outputs[0]
        assert c.finish_reason == "length" and c.stop_reason is None
        # an unfinished multi-byte character at the very end is never emitted
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True).rstrip("\ufffd")


def test_token_id_prompts_and_dicts(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("the quick")
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    a = llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)[0]
    b = llm.generate("the quick", greedy, use_tqdm=False)[0]
    c = llm.generate(ids, greedy, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids


def test_seeded_sampling_is_reproducible(llm):
    p = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True
    )
    first = llm.generate(["a", "bb"], p, use_tqdm=False)
    # same seed, in a different batch composition
    again = llm.generate(["zz", "bb", "a"], p, use_tqdm=False)
    assert first[0].outputs[0].token_ids == again[2].outputs[0].token_ids
    assert first[1].outputs[0].token_ids == again[1].outputs[0].token_ids
    other = SamplingParams(temperature=1.0, seed=99, max_tokens=12, ignore_eos=True)
    assert llm.generate("a", other, use_tqdm=False)[0].outputs[0].token_ids != (
        first[0].outputs[0].token_ids
    )


def test_stop_string_finishes_with_stop_and_is_cut(llm):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = llm.generate("the", greedy, use_tqdm=False)[0].outputs[0].text
    assert len(full) >= 6
    stop = full[3:5]
    out = llm.generate(
        "the",
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]),
        use_tqdm=False,
    )
    c = out[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == full[: full.index(stop)]
    kept = SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, stop=stop, include_stop_str_in_output=True
    )
    assert (
        llm.generate("the", kept, use_tqdm=False)[0].outputs[0].text
        == full[: full.index(stop) + len(stop)]
    )


def test_stop_token_ids_and_eos(llm):
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ids = llm.generate("a", greedy, use_tqdm=False)[0].outputs[0].token_ids
    target = ids[3]
    first = ids.index(target)
    p = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[target])
    c = llm.generate("a", p, use_tqdm=False)[0].outputs[0]
    assert c.token_ids == ids[: first + 1]
    assert (c.finish_reason, c.stop_reason) == ("stop", target)
    # min_tokens keeps the stop token from being sampled early
    p = SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[target], min_tokens=first + 2
    )
    c = llm.generate("a", p, use_tqdm=False)[0].outputs[0]
    assert target not in c.token_ids[: first + 2]


def test_logprobs_match_transformers(llm, folder):
    p = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
    out = llm.generate("the quick", p, use_tqdm=False)[0]
    c = out.outputs[0]
    ids = out.prompt_token_ids + c.token_ids
    with torch.no_grad():
        ref = hf_model(folder)(torch.tensor([ids])).logits[0].log_softmax(-1)
    total = 0.0
    for t, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[len(out.prompt_token_ids) - 1 + t]
        assert entry[tok].logprob == pytest.approx(float(row[tok]), abs=1e-4)
        assert entry[tok].rank == 1  # greedy
        top = row.topk(3)
        assert set(entry) >= set(top.indices.tolist())
        total += float(row[tok])
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_n_returns_n_sequences(llm):
    p = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    out = llm.generate("a", p, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logprobs": -2}, "logprobs"),
        ({"prompt_logprobs": 1.5}, "prompt_logprobs"),
        ({"seed": 2**70}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"temperature": float("nan")}, "temperature"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {3: float("inf")}}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"bad_words": [" "]}, "bad_words"),
        ({"output_kind": 7}, "output_kind"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        SamplingParams(**kwargs)


def test_bad_requests_fail_alone(folder):
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(folder), max_model_len=32))
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("ok", "the quick", greedy)
    with pytest.raises(ValueError, match="request id 'ok' is already running"):
        engine.add_request("ok", "again", greedy)
    with pytest.raises(ValueError, match="'empty': the prompt is empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(
        ValueError, match=r"'long': the prompt \(\d+ tokens\) is longer than max_model_len \(32\)"
    ):
        engine.add_request("long", "the quick brown fox " * 10, SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("oov", [1, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        engine.add_request("lora", "x", greedy, lora_request=LoRARequest("a", 1, "/a"))
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.finished)
    assert [o.request_id for o in outs] == ["ok"]
    assert len(outs[0].outputs[0].token_ids) == 4


def test_abort(folder):
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(folder)))
    p = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    engine.add_request("a", "x", p)
    engine.add_request("b", "y", p)
    engine.step()
    engine.abort_request("a")
    final = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    assert final["a"].outputs[0].finish_reason == "abort"
    assert len(final["a"].outputs[0].token_ids) < 50
    assert final["b"].outputs[0].finish_reason == "length"


def test_add_request_from_other_threads(folder):
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(folder)))
    p = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    threads = [
        threading.Thread(target=lambda i=i: engine.add_request(f"t{i}", "a" * (i + 1), p))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = set()
    while engine.has_unfinished_requests():
        done |= {o.request_id for o in engine.step() if o.finished}
    assert done == {f"t{i}" for i in range(8)}


def test_lora_request_list_length_must_match(llm):
    with pytest.raises(ValueError, match="lora_request has 1 entries but there are 2 prompts"):
        llm.generate(["a", "b"], lora_request=[None])


def test_unsupported_architecture_lists_supported(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        LLM(model=str(tmp_path))


def test_unresolvable_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        LLM(model="no-such-org/no-such-model")


def test_sharded_checkpoint_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    src = build_model(tmp_path / "one", "llama")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((src / f).read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = LLM(model=str(src)).generate("the", greedy, use_tqdm=False)[0].outputs[0].token_ids
    b = LLM(model=str(sharded)).generate("the", greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b


def test_full_queue_refuses_the_request_and_leaves_nothing_behind(folder, monkeypatch):
    from loraplex import QueueFullError

    engine = LLMEngine.from_engine_args(EngineArgs(model=str(folder)))
    real = engine.scheduler

    class FullQueue:
        def add_request(self, *args, **kwargs):
            raise QueueFullError("request queue is full (1 pending submissions)")

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(engine, "scheduler", FullQueue())
    with pytest.raises(QueueFullError):
        engine.add_request("x", "a", SamplingParams(max_tokens=2))
    monkeypatch.setattr(engine, "scheduler", real)
    assert not engine.has_unfinished_requests()
    engine.add_request("x", "a", SamplingParams(max_tokens=2))  # the id is free again
    while engine.has_unfinished_requests():
        engine.step()


@given(st.integers(1, 6), st.integers(0, 6), st.integers(0, 12), st.integers(0, 12))
def test_property_sequence_token_slices(n_prompt, n_out, start, length):
    from loraplex.engine.sequence import Request, Sequence

    request = Request("r", None, list(range(100, 100 + n_prompt)), SamplingParams(), None)
    seq = Sequence(0, 0, request, None, None, output_ids=list(range(200, 200 + n_out)))
    end = min(start + length, n_prompt + n_out)
    start = min(start, end)
    assert seq.tokens(start, end) == seq.token_ids[start:end]
