"""The engine against transformers: greedy tokens equal transformers' argmax over the same
prefix, for Llama (llama3 RoPE scaling), Mistral (sliding window) and Qwen2 (q/k/v bias, tied
embeddings), in batches, with arrivals mid-decode, chunked prefill, preemption, bfloat16."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import greedy_mismatches
from loraplex import LLM, EngineArgs, LLMEngine, SamplingParams
from loraplex.model import attention
from tiny_models import build_model, hf_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
ARCHS = {
    "llama": {"rope_scaling": LLAMA3_ROPE},
    "mistral": {"sliding_window": 12},
    "qwen2": {"tie_word_embeddings": True},
}
PROMPTS = [
    "a",
    "the quick brown fox jumps over the lazy dog and keeps running far away",
    "SELECT name FROM users",
    "héllo 🙂",
    "def add(a, b):",
]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="session", params=list(ARCHS))
def model_dir(request, tmp_path_factory):
    arch = request.param
    return build_model(tmp_path_factory.mktemp(arch), arch, **ARCHS[arch])


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("llama-only"), "llama", **ARCHS["llama"])


def test_one_request(model_dir):
    llm = LLM(model=str(model_dir))
    outs = llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 12
    assert greedy_mismatches(hf_model(model_dir), outs) == []


def test_batch_of_different_lengths_keeps_input_order(model_dir, kernels):
    llm = LLM(model=str(model_dir))
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS
    assert greedy_mismatches(hf_model(model_dir), outs) == []


def test_requests_arriving_while_others_decode(model_dir, kernels):
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(model_dir)))
    done = {}
    pending = list(enumerate(PROMPTS))
    engine.add_request("r0", PROMPTS[0], GREEDY)
    pending.pop(0)
    while engine.has_unfinished_requests() or pending:
        if pending:  # one new arrival per step, while the earlier ones decode
            i, p = pending.pop(0)
            engine.add_request(f"r{i}", p, GREEDY)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert sorted(done) == [f"r{i}" for i in range(len(PROMPTS))]
    assert greedy_mismatches(hf_model(model_dir), done.values()) == []


def test_chunked_prefill(model_dir):
    llm = LLM(model=str(model_dir), max_num_seqs=2, max_num_batched_tokens=4)
    long_prompt = " ".join(PROMPTS)
    outs = llm.generate([long_prompt, PROMPTS[2]], GREEDY, use_tqdm=False)
    assert len(outs[0].prompt_token_ids) > 8  # several chunks of at most 4 tokens
    assert greedy_mismatches(hf_model(model_dir), outs) == []


def test_preemption_under_a_tiny_kv_budget(llama_dir):
    # 16 blocks of 4 tokens: five requests growing by 16 tokens cannot all stay resident
    llm = LLM(model=str(llama_dir), block_size=4, num_gpu_blocks_override=16, max_model_len=64)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.llm_engine.num_preemptions > 0
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
    assert greedy_mismatches(hf_model(llama_dir), outs) == []


def test_bfloat16_against_transformers_in_bfloat16(model_dir):
    llm = LLM(model=str(model_dir), dtype="bfloat16")
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    hf = hf_model(model_dir, dtype=torch.bfloat16)
    assert greedy_mismatches(hf, outs, torch.bfloat16) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("corruption", ["no_self_attention", "decode_position_off_by_one"])
def test_negative_controls_the_oracle_catches_a_broken_engine(
    llama_dir, monkeypatch, dtype, corruption
):
    """The tolerance has teeth: a wrong mask or position must fail the same check."""
    real = attention.build_metadata

    def broken(*args, **kwargs):
        meta = real(*args, **kwargs)
        for g in meta.groups:
            if corruption == "no_self_attention":
                q_pos = torch.zeros_like(g.query_index)
                q_pos[g.valid] = meta.positions[g.rows]
                keys = torch.arange(g.mask.shape[-1])
                g.mask &= ~(keys[None, None, :] == q_pos[:, :, None])[:, None]
                g.mask[..., 0] |= ~g.mask.any(-1)  # position 0 keeps its only key
                if g.valid.shape[1] == 1:  # the C++ decode attention reads a key range
                    g.key_end -= 1
            elif g.valid.shape[1] == 1:  # decode group: positions one too far
                meta.positions[g.rows] += 1
        return meta

    monkeypatch.setattr("loraplex.engine.model_runner.build_metadata", broken)
    llm = LLM(model=str(llama_dir), dtype=dtype)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert greedy_mismatches(hf_model(llama_dir, dtype), outs, dtype) != []


def test_max_model_len_caps_output_with_length(llama_dir):
    llm = LLM(model=str(llama_dir), max_model_len=20)
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    (out,) = llm.generate(PROMPTS[2], params, use_tqdm=False)
    n_prompt = len(out.prompt_token_ids)
    assert n_prompt < 20
    assert len(out.outputs[0].token_ids) == 20 - n_prompt
    assert out.outputs[0].finish_reason == "length"
