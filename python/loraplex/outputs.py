"""What generation returns, with vLLM's classes and fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraplex.logprobs import Logprob, PromptLogprobs, SampleLogprobs

if TYPE_CHECKING:
    from loraplex._core import LoRARequest

__all__ = ["CompletionOutput", "Logprob", "RequestMetrics", "RequestOutput"]


@dataclass
class CompletionOutput:
    """One generated sequence of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    lora_request: LoRARequest | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """vLLM's request timings, in seconds (``time.time()`` clock). ``scheduler_time`` and
    ``model_forward_time`` add up the steps the request took part in."""

    arrival_time: float
    last_token_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time_in_queue: float | None = None
    finished_time: float | None = None
    scheduler_time: float = 0.0
    model_forward_time: float = 0.0
    model_execute_time: float = 0.0
    # loraplex: the gap before each generated token after each sequence's first (vLLM's
    # inter-token latencies), on a request's final output only
    token_gaps: list[float] | None = None


@dataclass
class RequestOutput:
    """The state of one request after a step (streaming) or at its end. Every list in it is
    its own: nothing is shared with the engine or with another output."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: LoRARequest | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache, not computed
    error: str | None = None  # why the engine aborted the request, when it did
