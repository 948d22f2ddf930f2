"""Per-request state on the Python side: tokens, text, logprobs, finish reason."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from loraplex._core import LoRARequest
from loraplex.outputs import CompletionOutput, Logprob, RequestOutput
from loraplex.sampling_params import SamplingParams
from loraplex.tokenizer import Detokenizer


@dataclass(eq=False)
class Sequence:
    """One of a request's ``n`` generated sequences; ``seq_id`` is the scheduler's id."""

    seq_id: int
    index: int
    request: Request
    detokenizer: Detokenizer
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.request.prompt_token_ids + self.output_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """``token_ids[start:end]`` without building the whole list (the step's hot path)."""
        prompt = self.request.prompt_token_ids
        p = len(prompt)
        if end <= p:
            return prompt[start:end]
        return prompt[start:] + self.output_ids[max(0, start - p) : end - p]

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.stop_reason = reason, stop_reason

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.output_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            lora_request=self.request.lora_request,
        )


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_request: LoRARequest | None
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    error: str | None = None

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=None,
            outputs=[s.completion() for s in self.seqs],
            finished=self.is_finished,
            lora_request=self.lora_request,
            error=self.error,
        )
