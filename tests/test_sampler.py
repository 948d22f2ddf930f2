"""The sampler on crafted logits: penalties, min_tokens, top-k / top-p / min-p support,
seeded reproducibility, logprob ranks."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from loraplex.sampler import Sampler, SampleRow
from loraplex.sampling_params import SamplingParams


def row(params, prompt=(), output=(), generator=None, blocked=()):
    return SampleRow(params, list(prompt), list(output), generator, list(blocked))


def test_greedy_takes_argmax_and_reports_rank_one():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    out = Sampler(0)(logits, [row(SamplingParams(temperature=0, logprobs=2))])
    assert out.token_ids == [1]
    assert out.ranks == [1]
    assert out.logprobs[0] == torch.log_softmax(logits[0], -1)[1].item()
    assert [t for t, _ in out.top[0]] == [1, 3]


def test_frequency_and_presence_penalties_use_output_counts():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    p = SamplingParams(temperature=0, frequency_penalty=0.6, presence_penalty=0.5)
    # token 0 seen twice: 5 - 2*0.6 - 0.5 = 3.3 < 4
    assert Sampler(0)(logits, [row(p, output=[0, 0])]).token_ids == [1]
    # seen once: 5 - 0.6 - 0.5 = 3.9 < 4 as well; unseen: stays 5
    assert Sampler(0)(logits, [row(p, output=[2])]).token_ids == [0]
    # prompt tokens do not count for these two penalties
    assert Sampler(0)(logits, [row(p, prompt=[0, 0, 0])]).token_ids == [0]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert Sampler(0)(torch.tensor([[4.0, 3.0]]), [row(p, prompt=[0])]).token_ids == [1]  # 2 < 3
    assert Sampler(0)(torch.tensor([[-1.0, -1.5]]), [row(p, output=[0])]).token_ids == [
        1
    ]  # -2 < -1.5


def test_min_tokens_blocks_stop_tokens_until_reached():
    p = SamplingParams(temperature=0, min_tokens=2)
    logits = torch.tensor([[9.0, 1.0]])
    assert Sampler(0)(logits, [row(p, output=[1], blocked=[0])]).token_ids == [1]
    assert Sampler(0)(logits, [row(p, output=[1, 1], blocked=[0])]).token_ids == [0]


def draw(params, logits, n=400, seed=0):
    s = Sampler(seed)
    rows = [row(params) for _ in range(n)]
    return s(logits.expand(n, -1).clone(), rows).token_ids


LOGITS = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.06, 0.04]]))


def test_top_k_limits_support():
    assert set(draw(SamplingParams(temperature=1.0, top_k=2), LOGITS)) <= {0, 1}


def test_top_p_limits_support():
    # cumulative 0.4, 0.7, 0.9: top_p=0.65 keeps tokens 0 and 1
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.65), LOGITS)) == {0, 1}


def test_min_p_limits_support():
    # min_p=0.3 of the top probability 0.4 = 0.12: keeps tokens 0, 1, 2
    assert set(draw(SamplingParams(temperature=1.0, min_p=0.3), LOGITS)) == {0, 1, 2}


def test_sampling_follows_the_distribution():
    counts = torch.bincount(
        torch.tensor(draw(SamplingParams(temperature=1.0), LOGITS, n=4000)), minlength=5
    )
    freq = counts.float() / 4000
    expected = torch.tensor([0.4, 0.3, 0.2, 0.06, 0.04])
    # 5 standard deviations of a binomial proportion at n=4000
    assert ((freq - expected).abs() <= 5 * (expected * (1 - expected) / 4000).sqrt()).all(), freq


@given(st.integers(0, 2**31), st.floats(0.1, 2.0))
def test_property_seeded_rows_reproduce(seed, temperature):
    p = SamplingParams(temperature=temperature, seed=seed)
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(seed % 1000))
    a = Sampler(1)(logits, [row(p, generator=torch.Generator().manual_seed(seed))]).token_ids
    b = Sampler(2)(logits, [row(p, generator=torch.Generator().manual_seed(seed))]).token_ids
    assert a == b
    assert not math.isnan(logits.sum().item())
