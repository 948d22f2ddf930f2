"""No input wedges the engine: whatever a caller passes or whatever happens to an adapter's
files, the call raises an error naming the culprit, or that request ends with 'abort' and an
error naming it. Every other request gets the tokens it would have had alone, the engine
keeps stepping, and every KV block comes back."""

from __future__ import annotations

import itertools
import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex import AdapterInUseError, EngineArgs, LLMEngine, LoRARequest, SamplingParams
from loraplex.errors import InvalidAdapterError
from tiny_adapters import build_adapter, edit_config, edit_weights, first_key
from tiny_models import build_model

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
IDS = itertools.count(100)
FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("wedge-base"), "llama")


@pytest.fixture(scope="module")
def good(base, tmp_path_factory):
    return build_adapter(base, tmp_path_factory.mktemp("good") / "a", r=8, alpha=16, seed=5)


@pytest.fixture(scope="module")
def other(base, tmp_path_factory):
    path = build_adapter(base, tmp_path_factory.mktemp("other") / "o", r=8, alpha=16, seed=6)
    return LoRARequest("other", 1, str(path))


def new_engine(base, **kw):
    kw = {"enable_lora": True, "max_loras": 1, "max_cpu_loras": 1, "max_lora_rank": 8, **kw}
    return LLMEngine.from_engine_args(EngineArgs(model=str(base), **kw))


def run(engine, max_steps=500):
    done = {}
    for _ in range(max_steps):  # bounded by steps, never by time
        if not engine.has_unfinished_requests():
            break
        done |= {o.request_id: o for o in engine.step() if o.finished}
    assert not engine.has_unfinished_requests(), "the engine stopped finishing requests"
    return done


def assert_all_blocks_free(engine):
    s = engine.scheduler
    assert (s.num_free_blocks, s.num_running, s.num_waiting) == (s.num_blocks, 0, 0)


@pytest.fixture(scope="module")
def alone(base, other):
    """Each witness request's tokens when it runs alone."""
    engine = new_engine(base)
    engine.add_request("b", "the quick", GREEDY)
    base_tokens = run(engine)["b"].outputs[0].token_ids
    engine.add_request("o", "the quick", GREEDY, lora_request=other)
    return {"b": base_tokens, "o": run(engine)["o"].outputs[0].token_ids}


def add_witnesses(engine, other, tag=""):
    engine.add_request("b" + tag, "the quick", GREEDY)
    engine.add_request("o" + tag, "the quick", GREEDY, lora_request=other)


def check_witnesses(done, alone, tag=""):
    for name in ("b", "o"):
        out = done[name + tag]
        assert out.error is None and out.outputs[0].token_ids == alone[name], out


def copy_adapter(good, tmp_path) -> tuple[LoRARequest, object]:
    lora_id = next(IDS)
    folder = tmp_path / f"a{lora_id}"
    shutil.copytree(good, folder)
    return LoRARequest(f"adapter-{lora_id}", lora_id, str(folder)), folder


def as_bin(folder, payload):
    (folder / "adapter_model.safetensors").unlink()
    torch.save(payload, folder / "adapter_model.bin")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(logprobs=10**6), "logprobs"),
        (dict(prompt_logprobs=10**6), "prompt_logprobs"),
        (dict(stop_token_ids=[10**6], min_tokens=2), "stop_token_ids"),
        (dict(logit_bias={10**6: 1.0}), "logit_bias"),
        (dict(allowed_token_ids=[3, 10**6]), "allowed_token_ids"),
    ],
)
def test_params_outside_the_model_are_refused_at_submission(base, other, alone, kwargs, field):
    engine = new_engine(base)
    add_witnesses(engine, other)
    with pytest.raises(ValueError, match=rf"request 'bad': SamplingParams\.{field}"):
        engine.add_request("bad", "the quick", SamplingParams(max_tokens=4, **kwargs))
    check_witnesses(run(engine), alone)
    assert_all_blocks_free(engine)


@pytest.mark.parametrize(
    "break_it, cause",
    [
        (lambda f: edit_config(f, rank_pattern="down_proj"), "rank_pattern must be a mapping"),
        (lambda f: edit_config(f, alpha_pattern={"(": 4}), "is not a regex"),
        (
            lambda f: (f / "adapter_config.json").write_text("[" * 200_000 + "]" * 200_000),
            "adapter_config.json is malformed",
        ),
        (
            lambda f: edit_weights(
                f, lambda t: t.update({first_key(t, "lora_A"): torch.tensor(1.0)})
            ),
            "do not fit",
        ),
        (lambda f: as_bin(f, [1, 2, 3]), "not a mapping of names to tensors"),
        (lambda f: as_bin(f, 7), "not a mapping of names to tensors"),
        (lambda f: as_bin(f, {"x.lora_A.weight": 3}), "not a mapping of names to tensors"),
        (lambda f: edit_config(f, lora_alpha=float("nan")), "lora_alpha must be a positive"),
        (lambda f: edit_config(f, lora_alpha=1e300), "non-finite"),
        (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
    ],
)
def test_adapter_that_goes_bad_on_disk_fails_alone_mid_batch(
    base, good, other, alone, tmp_path, break_it, cause
):
    """Registered while valid, evicted from the one host slot, broken on disk, then needed
    again in a batch with others."""
    engine = new_engine(base)
    doomed, folder = copy_adapter(good, tmp_path)
    assert engine.add_lora(doomed) is True
    assert engine.add_lora(other) is True  # evicts doomed's validated copy
    assert engine.list_loras() == {other.lora_int_id}
    break_it(folder)
    engine.add_request("d", "the quick", GREEDY, lora_request=doomed)
    add_witnesses(engine, other)
    done = run(engine)
    assert done["d"].outputs[0].finish_reason == "abort"
    assert f"adapter '{doomed.lora_name}' (id {doomed.lora_int_id}" in done["d"].error
    assert str(folder) in done["d"].error and cause in done["d"].error, done["d"].error
    check_witnesses(done, alone)
    assert_all_blocks_free(engine)
    add_witnesses(engine, other, "2")  # serves on
    check_witnesses(run(engine), alone, "2")


@pytest.mark.parametrize("alpha", [float("nan"), 1e300, float("inf")])
def test_bad_alpha_is_refused_at_submission(base, good, other, alone, tmp_path, alpha):
    engine = new_engine(base)
    bad, folder = copy_adapter(good, tmp_path)
    edit_config(folder, lora_alpha=alpha)
    add_witnesses(engine, other)
    with pytest.raises(InvalidAdapterError, match=rf"adapter '{bad.lora_name}'"):
        engine.add_request("bad", "the quick", GREEDY, lora_request=bad)
    check_witnesses(run(engine), alone)
    assert engine.list_loras() == {other.lora_int_id}


def test_remove_lora_refuses_while_a_request_is_queued(base, other, alone):
    engine = new_engine(base)
    engine.add_request("o", "the quick", GREEDY, lora_request=other)  # queued, not stepped
    with pytest.raises(AdapterInUseError, match="in use by 1 unfinished"):
        engine.remove_lora(other.lora_int_id)
    done = run(engine)
    assert done["o"].outputs[0].token_ids == alone["o"]
    assert engine.remove_lora(other.lora_int_id) is True
    assert engine.list_loras() == set()


def test_request_ids_are_strings_for_every_method(base):
    engine = new_engine(base)
    with pytest.raises(TypeError, match="request_id must be a str, got int"):
        engine.add_request(77, "the quick", GREEDY)
    with pytest.raises(TypeError, match="request_id must be a str, got int"):
        engine.abort_request(77)
    with pytest.raises(TypeError, match="request_id must be a str, got int"):
        engine.abort_request(["x", 77])
    engine.add_request("77", "the quick", GREEDY)
    engine.abort_request("77")
    assert run(engine)["77"].outputs[0].finish_reason == "abort"
    assert_all_blocks_free(engine)


def test_seed_beyond_64_bits_names_seed():
    with pytest.raises(ValueError, match=r"^seed must be an int in"):
        SamplingParams(seed=2**70)
    SamplingParams(seed=2**64 - 1, n=3)  # the edge works, and its n seeds wrap


def test_a_failing_step_aborts_only_its_batch(base, other, alone, monkeypatch):
    engine = new_engine(base)
    engine.add_request("victim", "the quick", GREEDY)
    real = engine.runner.run
    calls = itertools.count()

    def flaky(*args, **kwargs):
        if next(calls) == 0:
            raise RuntimeError("simulated kernel failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "run", flaky)
    out = {o.request_id: o for o in engine.step()}
    assert out["victim"].finished and out["victim"].outputs[0].finish_reason == "abort"
    assert "simulated kernel failure" in out["victim"].error
    assert_all_blocks_free(engine)
    add_witnesses(engine, other)
    check_witnesses(run(engine), alone)
    assert_all_blocks_free(engine)


# ---- fuzzing -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
config_fields = st.sampled_from(
    [
        "r",
        "lora_alpha",
        "target_modules",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "bias",
        "peft_type",
        "modules_to_save",
        "fan_in_fan_out",
        "use_dora",
    ]
)


@FUZZ
@given(changes=st.dictionaries(config_fields, json_values, min_size=1, max_size=3))
def test_fuzzed_adapter_config_fails_alone(base, good, other, alone, tmp_path, changes):
    _fuzz_adapter(base, good, other, alone, tmp_path, lambda f: edit_config(f, **changes))


tensor_edits = st.one_of(
    st.tuples(st.just("shape"), st.lists(st.integers(0, 9), min_size=0, max_size=3)),
    st.tuples(st.just("dtype"), st.sampled_from(["int32", "float16", "bfloat16", "bool", "int8"])),
    st.tuples(st.just("value"), st.sampled_from([math.nan, math.inf, -math.inf, 1e30])),
    st.tuples(st.just("drop"), st.none()),
    st.tuples(st.just("rename"), st.text(min_size=1, max_size=12)),
    st.tuples(st.just("header"), st.binary(max_size=24)),
)


def _edit_tensors(folder, edit, which: str):
    kind, arg = edit
    path = folder / "adapter_model.safetensors"
    if kind == "header":
        path.write_bytes(arg + path.read_bytes()[len(arg) :])
        return

    def fn(t):
        key = first_key(t, which)
        if kind == "shape":
            t[key] = torch.randn(arg) if arg else torch.tensor(0.5)
        elif kind == "dtype":
            t[key] = t[key].to(getattr(torch, arg))
        elif kind == "value":
            t[key] = t[key].clone()
            t[key].view(-1)[0] = arg
        elif kind == "drop":
            del t[key]
        else:
            t[arg] = t.pop(key)

    edit_weights(folder, fn)


@FUZZ
@given(edit=tensor_edits, which=st.sampled_from(["lora_A", "lora_B"]))
def test_fuzzed_safetensors_fail_alone(base, good, other, alone, tmp_path, edit, which):
    _fuzz_adapter(base, good, other, alone, tmp_path, lambda f: _edit_tensors(f, edit, which))


def _fuzz_adapter(base, good, other, alone, tmp_path, break_it):
    """Either refused at submission naming the adapter, or the request ends (served, or
    aborted naming the adapter) — on both paths, at submission and read again mid-batch."""
    for mid_batch in (False, True):
        engine = new_engine(base)
        req, folder = copy_adapter(good, tmp_path)
        if mid_batch:
            engine.add_lora(req)
            engine.add_lora(other)  # evicts req's validated copy
        break_it(folder)
        add_witnesses(engine, other)
        try:
            engine.add_request("d", "the quick", GREEDY, lora_request=req)
        except ValueError as e:
            assert f"adapter '{req.lora_name}'" in str(e), e
        done = run(engine)
        if "d" in done and done["d"].error is not None:
            assert f"adapter '{req.lora_name}'" in done["d"].error
        check_witnesses(done, alone)
        assert_all_blocks_free(engine)


sampling_fields = {
    "n": st.integers(-2, 3),
    "temperature": st.floats(allow_nan=True) | st.integers(-1, 3),
    "top_p": st.floats(allow_nan=True),
    "top_k": st.integers(-3, 500),
    "min_p": st.floats(allow_nan=True),
    "seed": st.none() | st.integers(-(2**70), 2**70),
    "stop": st.none() | st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
    "stop_token_ids": st.lists(st.integers(-5, 10**7), max_size=3),
    "max_tokens": st.none() | st.integers(-1, 4),
    "min_tokens": st.integers(-1, 5),
    "logprobs": st.none() | st.integers(-3, 10**6),
    "prompt_logprobs": st.none() | st.integers(-3, 10**6),
    "logit_bias": st.none() | st.dictionaries(st.integers(-5, 10**6), st.floats(allow_nan=True)),
    "allowed_token_ids": st.none() | st.lists(st.integers(-5, 10**6), max_size=3),
    "bad_words": st.none() | st.lists(st.text(max_size=4), max_size=2),
    "repetition_penalty": st.floats(allow_nan=True),
    "presence_penalty": st.floats(allow_nan=True),
}


@pytest.fixture(scope="module")
def shared_engine(base):
    return new_engine(base)


@FUZZ
@given(kwargs=st.fixed_dictionaries({}, optional=sampling_fields))
def test_fuzzed_sampling_params_fail_alone(shared_engine, other, alone, kwargs):
    engine = shared_engine
    kwargs.setdefault("max_tokens", 4)
    if kwargs["max_tokens"] is None:
        kwargs["max_tokens"] = 4  # bounded output: the fuzz is about validity, not length
    try:
        params = SamplingParams(**kwargs)
    except (ValueError, TypeError) as e:
        assert any(name in str(e) for name in kwargs), e
        return
    add_witnesses(engine, other)
    try:
        engine.add_request("f", "the quick", params)
    except ValueError as e:
        assert "SamplingParams." in str(e), e
    done = run(engine)
    check_witnesses(done, alone)
    if "f" in done:
        f = done["f"]
        # allowed tokens that min_tokens holds back (stop or EOS ids) leave nothing to
        # sample: that request alone ends with the dead end named
        boxed_in = bool(kwargs.get("allowed_token_ids")) and (kwargs.get("min_tokens") or 0) > 0
        if boxed_in and f.error is not None:
            assert "no token to sample" in f.error and f.finished, f.error
        else:
            assert f.error is None and f.finished
    assert_all_blocks_free(engine)
