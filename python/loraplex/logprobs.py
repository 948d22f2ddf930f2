"""Log-probabilities as vLLM returns them (``vllm.logprobs``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    """A token's log-probability, its rank in the distribution (1 = most likely), and text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# one dict per position: the chosen (or prompt) token and the top-k, by token id
PromptLogprobs = list[dict[int, Logprob] | None]  # first entry None: nothing predicts it
SampleLogprobs = list[dict[int, Logprob]]
