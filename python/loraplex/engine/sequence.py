"""Per-request state on the Python side: tokens, text, logprobs, timings, finish reason; and
the outputs built from it, each holding copies (never the engine's own lists)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from loraplex._core import LoRARequest
from loraplex.logprobs import Logprob, PromptLogprobs
from loraplex.outputs import CompletionOutput, RequestMetrics, RequestOutput
from loraplex.sampling_params import RequestOutputKind, SamplingParams
from loraplex.structured_outputs import Matcher
from loraplex.tokenizer import Detokenizer


@dataclass(eq=False)
class Sequence:
    """One of a request's ``n`` generated sequences; ``seq_id`` is the scheduler's id."""

    seq_id: int
    index: int
    request: Request
    detokenizer: Detokenizer
    generator: torch.Generator | None
    matcher: Matcher | None = None  # its place in its structured output's grammar
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # what the last DELTA output reached: tokens, characters of text
    num_reported: int = 0
    text_reported: int = 0

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

    def completion(self, delta: bool) -> CompletionOutput:
        start, text_start = (self.num_reported, self.text_reported) if delta else (0, 0)
        self.num_reported, self.text_reported = len(self.output_ids), len(self.text)
        logprobs = None if self.logprobs is None else self.logprobs[start:]
        return CompletionOutput(
            index=self.index,
            text=self.text[text_start:],
            token_ids=self.output_ids[start:],
            cumulative_logprob=self.cumulative_logprob,
            logprobs=logprobs,
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
    arrival_time: float = field(default_factory=time.time)
    priority: int = 0
    bad_word_ids: list[list[int]] = field(default_factory=list)
    seqs: list[Sequence] = field(default_factory=list)
    error: str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    metrics: RequestMetrics = field(init=False)
    num_outputs: int = 0
    num_generated: int = 0  # tokens over all sequences, as of the last step
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache, at admission
    token_gaps: list[float] = field(default_factory=list)
    tenant: str | None = None  # whose share it counts against under fair share

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(self.arrival_time, self.arrival_time)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def output(self) -> RequestOutput | None:
        """This step's output, as ``params.output_kind`` asks; ``None`` when there is none
        to give (FINAL_ONLY before the end)."""
        kind = self.params.output_kind
        finished = self.is_finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        first = self.num_outputs == 0
        self.num_outputs += 1
        if finished and self.metrics.finished_time is None:
            self.metrics.finished_time = time.time()
        prompt_logprobs = None
        if self.prompt_logprobs is not None and (first or not delta):
            prompt_logprobs = list(self.prompt_logprobs)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            prompt_logprobs=prompt_logprobs,
            outputs=[s.completion(delta) for s in self.seqs],
            finished=finished,
            lora_request=self.lora_request,
            metrics=RequestMetrics(
                **{**vars(self.metrics), "token_gaps": list(self.token_gaps) if finished else None}
            ),
            num_cached_tokens=self.num_cached_tokens or 0,
            error=self.error,
        )
