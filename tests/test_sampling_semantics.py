"""vLLM's sampling and stopping meaning, checked against transformers' logits for the same
model: sampled frequencies follow softmax(logits / temperature), top_k keeps exactly the k
most likely, logit_bias / allowed_token_ids / bad_words, the earliest stop string wins, stop
token ids and EOS report what vLLM reports."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from loraplex import LLM, SamplingParams
from tiny_models import build_model, hf_model

PROMPT = "the quick brown"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("semantics"), "llama")


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(model=str(folder), max_logprobs=-1)


@pytest.fixture(scope="module")
def next_logits(folder, llm):
    ids = llm.get_tokenizer().encode(PROMPT)
    with torch.no_grad():
        return hf_model(folder)(torch.tensor([ids])).logits[0, -1].double()


def first_tokens(llm, n: int, seeds: range, **params) -> Counter:
    """First sampled token of n sequences for each seed, counted. Sequence i of a request
    draws with seed + i: the seeds are spaced so no two draws share one."""
    counts: Counter = Counter()
    for seed in seeds:
        seed *= 10**6
        p = SamplingParams(n=n, max_tokens=1, seed=seed, ignore_eos=True, **params)
        for c in llm.generate(PROMPT, p, use_tqdm=False)[0].outputs:
            counts[c.token_ids[0]] += 1
    return counts


def total_variation(counts: Counter, probs: torch.Tensor) -> float:
    total = sum(counts.values())
    empirical = torch.zeros_like(probs)
    for token, k in counts.items():
        empirical[token] = k / total
    return 0.5 * float((empirical - probs).abs().sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampled_frequencies_follow_softmax_over_temperature(llm, next_logits, temperature):
    counts = first_tokens(llm, 500, range(8), temperature=temperature)
    want = (next_logits / temperature).softmax(-1)
    tv = total_variation(counts, want)
    # 4,000 draws over a 400-token vocabulary: sampling noise alone leaves a distance of
    # 0.02 (T=0.5) to 0.12 (T=2, the flattest); the other temperatures' distributions are
    # 0.38 or more away (measured), so a sampler that ignores temperature fails
    assert tv < 0.15, tv
    for other in {0.5, 1.0, 2.0} - {temperature}:
        assert total_variation(counts, (next_logits / other).softmax(-1)) > tv + 0.2


def test_top_k_keeps_exactly_the_k_most_likely(llm, next_logits):
    k = 3
    counts = first_tokens(llm, 400, range(2), temperature=3.0, top_k=k)
    top = set(next_logits.topk(k).indices.tolist())
    assert set(counts) == top
    want = torch.zeros_like(next_logits)
    idx = next_logits.topk(k).indices
    want[idx] = (next_logits[idx] / 3.0).softmax(-1)
    assert total_variation(counts, want) < 0.05


def test_logit_bias_allowed_tokens_and_bad_words(llm, next_logits):
    greedy = dict(temperature=0, max_tokens=1, ignore_eos=True)
    best = int(next_logits.argmax())
    runner_up = int(next_logits.topk(2).indices[1])
    out = llm.generate(PROMPT, SamplingParams(**greedy, logit_bias={runner_up: 100.0}))[0]
    assert out.outputs[0].token_ids == [runner_up]
    allowed = [5, 9, 17]
    out = llm.generate(PROMPT, SamplingParams(**greedy, allowed_token_ids=allowed))[0]
    assert out.outputs[0].token_ids == [max(allowed, key=lambda t: next_logits[t])]
    word = llm.get_tokenizer().decode([best])
    out = llm.generate(PROMPT, SamplingParams(**greedy, bad_words=[word]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids != [best]


def greedy_text(llm, max_tokens=24):
    p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate(PROMPT, p, use_tqdm=False)[0].outputs[0]


def test_earliest_stop_string_wins_and_is_cut(llm):
    full = greedy_text(llm).text
    assert len(full) >= 12, full
    early, late = full[3:6], full[-4:]
    assert full.find(late) > full.find(early)
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[late, early])
    out = llm.generate(PROMPT, p, use_tqdm=False)[0].outputs[0]
    cut = full.find(early)
    assert out.text == full[:cut]
    assert (out.finish_reason, out.stop_reason) == ("stop", early)
    p.include_stop_str_in_output = True
    assert llm.generate(PROMPT, p, use_tqdm=False)[0].outputs[0].text == full[: cut + 3]


def test_stop_strings_completed_by_one_token_cut_at_the_earliest(llm):
    """Two stop strings that end with the same token: the one starting earlier wins."""
    ref = greedy_text(llm)
    tok = llm.get_tokenizer()
    full = ref.text
    for k in range(len(ref.token_ids), 0, -1):
        end = len(tok.decode(ref.token_ids[:k], skip_special_tokens=True))
        short, long = full[end - 2 : end], full[end - 5 : end]
        if end >= 6 and full.find(short) == end - 2 and full.find(long) == end - 5:
            break
    else:
        pytest.fail(f"no token boundary with fresh stop strings in {full!r}")
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[short, long])
    out = llm.generate(PROMPT, p, use_tqdm=False)[0].outputs[0]
    assert (out.text, out.stop_reason) == (full[: end - 5], long)


def test_stop_token_id_is_the_stop_reason(llm):
    ref = greedy_text(llm)
    k = len(ref.token_ids) // 2
    stop = ref.token_ids[k]
    first = ref.token_ids.index(stop)
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop])
    out = llm.generate(PROMPT, p, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    tok = llm.get_tokenizer()
    # the stop token's text left out
    assert out.text == tok.decode(ref.token_ids[:first], skip_special_tokens=True)


def test_eos_is_stop_with_no_stop_reason(llm):
    eos = llm.get_tokenizer().eos_token_id
    p = SamplingParams(temperature=0, max_tokens=5, logit_bias={eos: 100.0})
    out = llm.generate(PROMPT, p, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    p.ignore_eos = True
    out = llm.generate(PROMPT, p, use_tqdm=False)[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (5, "length")
    p = SamplingParams(temperature=0, max_tokens=5, logit_bias={eos: 100.0}, min_tokens=2)
    out = llm.generate(PROMPT, p, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[-1] == eos and len(out.token_ids) == 3


def test_logprobs_minus_one_is_the_whole_vocabulary(llm, next_logits):
    p = SamplingParams(temperature=0, max_tokens=1, logprobs=-1, prompt_logprobs=-1)
    out = llm.generate(PROMPT, p, use_tqdm=False)[0]
    entry = out.outputs[0].logprobs[0]
    assert len(entry) == next_logits.shape[0]
    ref = next_logits.log_softmax(-1)
    assert max(abs(lp.logprob - ref[t].item()) for t, lp in entry.items()) < 1e-4
    assert len(out.prompt_logprobs[1]) == next_logits.shape[0]
