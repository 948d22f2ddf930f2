"""Bad adapters get a clear error naming the adapter and the cause, and lose nothing: the
engine keeps serving every other request. Also when the failure comes inside a step."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file

from loraplex import EngineArgs, LLMEngine, LoRARequest, SamplingParams
from loraplex.errors import InvalidAdapterError
from tiny_adapters import PeftReference, build_adapter, edit_config, edit_weights, first_key
from tiny_models import build_model

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("err-base"), "llama")


@pytest.fixture(scope="module")
def good(base, tmp_path_factory):
    return build_adapter(base, tmp_path_factory.mktemp("good") / "a", r=8, alpha=16, seed=5)


def engine_for(base, **kw):
    kw = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8, **kw}
    return LLMEngine.from_engine_args(EngineArgs(model=str(base), **kw))


def run(engine):
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def copy(good, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(good, dst)
    return dst


CASES = {
    "missing path": (lambda d: shutil.rmtree(d), "is not a readable folder"),
    "malformed config": (
        lambda d: (d / "adapter_config.json").write_text("{not json"),
        "adapter_config.json is malformed",
    ),
    "rank above max": (lambda d: None, "above max_lora_rank=4"),
    "missing target": (
        lambda d: edit_config(d, target_modules=["c_attn"]),
        "'c_attn': LlamaForCausalLM has no such module",
    ),
    "unsupported target": (
        lambda d: edit_config(d, target_modules=["lm_head"]),
        "'lm_head' is not supported",
    ),
    "shapes": (
        lambda d: edit_weights(d, lambda t: t.update({first_key(t, "lora_A"): torch.zeros(8, 7)})),
        "do not fit the base model's",
    ),
    "non-finite": (
        lambda d: edit_weights(
            d, lambda t: t[first_key(t, "lora_B")].view(-1).__setitem__(0, float("nan"))
        ),
        "non-finite values",
    ),
    "bias": (lambda d: edit_config(d, bias="all"), "bias 'all' is not supported"),
    "dora": (lambda d: edit_config(d, use_dora=True), "DoRA"),
    "modules_to_save": (lambda d: edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "no weights file": (
        lambda d: (d / "adapter_model.safetensors").unlink(),
        "no adapter_model.safetensors",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_adapter_fails_alone_at_add_request(base, good, tmp_path, case):
    mutate, cause = CASES[case]
    bad_dir = copy(good, tmp_path)
    mutate(bad_dir)
    max_rank = 4 if case == "rank above max" else 8
    engine = engine_for(base, max_lora_rank=max_rank)
    bad = LoRARequest("bad-one", 7, str(bad_dir))
    engine.add_request("base", "a", GREEDY)
    with pytest.raises(InvalidAdapterError) as info:
        engine.add_request("victim", "a", GREEDY, lora_request=bad)
    msg = str(info.value)
    assert "adapter 'bad-one' (id 7" in msg and cause in msg, msg
    assert isinstance(info.value, ValueError)
    assert engine.list_loras() == set()  # nothing half-registered
    done = run(engine)
    assert sorted(done) == ["base"] and len(done["base"].outputs[0].token_ids) == 4


def test_base_model_name_and_tensorizer_are_checked(base, good):
    engine = engine_for(base)
    with pytest.raises(
        InvalidAdapterError, match="base_model_name 'meta-llama/Other' does not match"
    ):
        engine.add_lora(LoRARequest("x", 1, str(good), base_model_name="meta-llama/Other"))
    assert engine.add_lora(LoRARequest("y", 2, str(good), base_model_name=str(base))) is True
    with pytest.raises(InvalidAdapterError, match="tensorizer_config_dict is not supported"):
        engine.add_lora(LoRARequest("z", 3, str(good), tensorizer_config_dict={"uri": "s3://x"}))


def test_bin_checkpoint_loads_with_weights_only(base, good, tmp_path):
    as_bin = copy(good, tmp_path, "bin")
    tensors = load_file(str(as_bin / "adapter_model.safetensors"))
    (as_bin / "adapter_model.safetensors").unlink()
    torch.save(tensors, as_bin / "adapter_model.bin")
    engine = engine_for(base)
    engine.add_request("s", "the quick", GREEDY, lora_request=LoRARequest("st", 1, str(good)))
    engine.add_request("b", "the quick", GREEDY, lora_request=LoRARequest("bin", 2, str(as_bin)))
    done = run(engine)
    assert done["s"].outputs[0].token_ids == done["b"].outputs[0].token_ids


def test_failure_inside_a_step_fails_only_that_adapters_requests(base, good, tmp_path):
    other = build_adapter(base, tmp_path / "other", r=8, alpha=16, seed=6)
    doomed = copy(good, tmp_path, "doomed")
    # one host slot: validating 'other' after 'doomed' drops doomed's validated copy, so its
    # first load reads the disk again, inside step()
    engine = engine_for(base, max_loras=1, max_cpu_loras=1)
    engine.add_request("d1", "a", GREEDY, lora_request=LoRARequest("doomed", 1, str(doomed)))
    engine.add_request("o1", "a", GREEDY, lora_request=LoRARequest("other", 2, str(other)))
    engine.add_request("b1", "a", GREEDY)
    edit_weights(doomed, lambda t: t[first_key(t, "lora_A")].fill_(float("inf")))
    done = run(engine)
    assert done["d1"].outputs[0].finish_reason == "abort"
    assert "adapter 'doomed' (id 1" in done["d1"].error and "non-finite" in done["d1"].error
    assert done["o1"].outputs[0].finish_reason == "length" and done["o1"].error is None
    assert done["b1"].outputs[0].finish_reason == "length"
    assert engine.list_loras() == {2}
    ref = PeftReference(base, {"other": other})
    assert ref.mismatches([done["o1"]], ["other"]) == []


def test_failing_reload_is_read_before_anything_is_evicted_for_it(base, good, tmp_path):
    """An adapter whose validated copy is gone (the host tier holds one) and whose files went
    bad: it is read again, off the step thread, and nothing is evicted for it before it proves
    valid, so its requests fail and the adapter in the slot stays there."""
    other = build_adapter(base, tmp_path / "other", r=8, alpha=16, seed=6)
    doomed = copy(good, tmp_path, "doomed")
    engine = engine_for(base, max_loras=1, max_cpu_loras=1)
    doomed_req, other_req = (
        LoRARequest("doomed", 1, str(doomed)),
        LoRARequest("other", 2, str(other)),
    )
    engine.add_lora(doomed_req)
    engine.add_lora(other_req)  # one staged copy: doomed's is dropped
    engine.add_request("o1", "a", GREEDY, lora_request=other_req)
    assert run(engine)["o1"].error is None  # 'other' now holds the only slot
    edit_weights(doomed, lambda t: t[first_key(t, "lora_A")].fill_(float("nan")))
    traffic = []
    real = engine.scheduler

    class Spy:  # records every plan's slot traffic
        def schedule(self):
            plan = real.schedule()
            traffic.append((plan.loads, plan.commits))
            return plan

        def __getattr__(self, name):
            return getattr(real, name)

    engine.scheduler = Spy()
    engine.add_request("d1", "a", GREEDY, lora_request=doomed_req)
    engine.add_request("b1", "a", GREEDY)
    engine.add_request("o2", "a", GREEDY, lora_request=other_req)
    done = run(engine)
    assert done["d1"].outputs[0].finish_reason == "abort"
    assert "adapter 'doomed' (id 1" in done["d1"].error and "non-finite" in done["d1"].error
    assert done["b1"].error is None and done["o2"].error is None
    assert all(loads == [] and commits == [] for loads, commits in traffic)
    assert engine.list_loras() == {2}
    assert PeftReference(base, {"other": other}).mismatches([done["o2"]], ["other"]) == []


def test_unresolvable_hub_adapter_offline(base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine = engine_for(base)
    with pytest.raises(
        InvalidAdapterError, match=r"adapter 'hub' \(id 4.*could not be fetched as a hub repo"
    ):
        engine.add_lora(LoRARequest("hub", 4, "no-such-org/no-such-adapter"))
    assert engine.list_loras() == set()


def test_a_read_that_fails_in_the_loader_fails_only_its_requests(base, good, tmp_path):
    """The adapter was valid when registered; its host copy was then evicted and its next
    read, in the loader pool ahead of need, raises: its queued requests end with that error,
    the others run as they would alone, and the step thread never read the disk."""
    other = build_adapter(base, tmp_path / "other", r=8, alpha=16, seed=6)
    flaky, other_req = LoRARequest("flaky", 1, str(good)), LoRARequest("other", 2, str(other))
    engine = engine_for(base, max_loras=1, max_cpu_loras=1)
    engine.add_lora(flaky)
    engine.add_lora(other_req)  # one host slot: flaky's copy goes
    readers = []
    real_load = engine.lora.load

    def load(request):
        readers.append(threading.current_thread().name)
        if request.lora_name == "flaky":
            raise OSError("disk on fire")
        return real_load(request)

    engine.lora.load = load
    engine.add_request("f1", "a", GREEDY, lora_request=flaky)
    engine.add_request("o1", "a", GREEDY, lora_request=other_req)
    engine.add_request("f2", "the quick", GREEDY, lora_request=flaky)
    engine.add_request("b1", "a", GREEDY)
    done = run(engine)
    for rid in ("f1", "f2"):
        assert done[rid].outputs[0].finish_reason == "abort"
        assert "adapter 'flaky' (id 1" in done[rid].error and "disk on fire" in done[rid].error
    assert done["o1"].error is None and done["b1"].error is None
    assert PeftReference(base, {"other": other}).mismatches([done["o1"]], ["other"]) == []
    assert readers and all(name.startswith("loraplex-loader") for name in readers)
    assert engine.list_loras() == {2}
    assert engine.scheduler.num_free_blocks == engine.scheduler.num_blocks
    engine.lora.load = real_load  # registered again from scratch, it serves
    engine.add_request("f3", "a", GREEDY, lora_request=flaky)
    assert run(engine)["f3"].error is None


def test_other_requests_run_while_an_adapter_is_read(base, good, tmp_path):
    """A read in flight holds up only the requests that need it: the step thread keeps
    stepping the others (counted in steps, not time)."""
    slow_req = LoRARequest("slow", 1, str(good))
    engine = engine_for(base, max_loras=1, max_cpu_loras=1)
    engine.add_lora(slow_req)
    engine.add_lora(LoRARequest("evictor", 2, str(good)))  # slow's host copy goes
    release = threading.Event()
    real_load = engine.lora.load

    def load(request):
        if request.lora_name == "slow":
            release.wait()
        return real_load(request)

    engine.lora.load = load
    engine.add_request("s", "a", GREEDY, lora_request=slow_req)
    engine.add_request("b", "a", GREEDY)
    done = {}
    for _ in range(20):  # the base request finishes while slow's read is held up
        done |= {o.request_id: o for o in engine.step() if o.finished}
        if "b" in done:
            break
    assert "b" in done and "s" not in done
    release.set()
    done |= run(engine)
    assert done["s"].error is None and done["s"].outputs[0].finish_reason == "length"


def test_a_host_tier_that_does_not_fit_fails_at_start_naming_its_settings(base, monkeypatch):
    """The host tier is committed when the engine is built: memory the machine has not got
    fails there, naming the settings that size it (here the commit is made to fail)."""
    from loraplex.engine import host_memory

    zeros = host_memory.zeros

    def no_memory(shape, dtype, populate=False):
        if populate:
            raise MemoryError("cannot commit 1.00 GiB of host memory")
        return zeros(shape, dtype)

    monkeypatch.setattr(host_memory, "zeros", no_memory)
    with pytest.raises(MemoryError, match=r"max_cpu_loras=5 slots of .* MiB \(max_lora_rank=8"):
        engine_for(base, max_cpu_loras=5)
    monkeypatch.undo()
    engine = engine_for(base, max_cpu_loras=5)  # and nothing of the failed one is in the way
    assert engine.list_loras() == set()


@pytest.mark.parametrize("kind", ["missing", "a file", "unreadable"])
def test_generate_refuses_an_unreadable_local_path_before_queuing(base, good, tmp_path, kind):
    """Path accessibility at submission: ``LLM.generate`` raises, naming the adapter and the
    path, before any of its requests is queued (a hub id is left to the loader)."""
    from loraplex import LLM

    if kind == "missing":
        path, said = tmp_path / "gone", "does not exist"
    elif kind == "a file":
        path, said = tmp_path / "file.txt", "is not a folder"
        path.write_text("x")
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads every folder: an unreadable one cannot be made")
        path, said = copy(good, tmp_path, "locked"), "is not a readable folder"
        path.chmod(0)
    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=8)
    loras = [LoRARequest("good", 1, str(good)), LoRARequest("bad", 2, str(path))]
    with pytest.raises(InvalidAdapterError, match=rf"adapter 'bad' \(id 2.*{said}"):
        llm.generate(["a", "b"], GREEDY, lora_request=loras, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.list_loras() == set()  # nothing registered either
    out = llm.generate("a", GREEDY, lora_request=loras[0], use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
