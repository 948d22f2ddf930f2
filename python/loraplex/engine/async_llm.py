"""``AsyncLLM``: vLLM's asyncio engine. The step loop runs on its own thread, steps while any
request is unfinished and sleeps on an event when none is (no busy spin); each request's
outputs reach its consumer through an ``asyncio.Queue`` on the consumer's event loop. A
consumer that stops listening (cancelled, or leaving ``async for`` early) aborts its
request."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from loraplex._core import LoRARequest
from loraplex.engine.arg_utils import AsyncEngineArgs, EngineArgs
from loraplex.engine.input_processor import Prompt
from loraplex.engine.llm_engine import LLMEngine, ModelFrontend
from loraplex.model.config import ModelConfig
from loraplex.outputs import RequestOutput
from loraplex.sampling_params import SamplingParams
from loraplex.tokenizer import Tokenizer


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error it could not confine to one batch."""


class _Stream:
    """One request's way to its consumer: a queue on the consumer's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass  # the consumer's loop is closed: nobody is listening


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def dispatch(
    outputs: list[RequestOutput], streams: dict[str, _Stream], lock: threading.Lock
) -> None:
    """Hands a step's outputs to their consumers: one wake-up of each consumer loop per
    step, not one per output (32 streams would be 32 self-pipe writes a step). A finished
    request's stream leaves ``streams``."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    with lock:
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, out))
                if out.finished:
                    del streams[out.request_id]
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:
            pass  # the consumers' loop is closed: nobody is listening


def submission_grows(
    engine: LLMEngine, prompt: Prompt, params: SamplingParams, lora_request: Any
) -> bool:
    """Whether submitting this request does work that grows with it or blocks (an
    adapter's first read or an in-place reload, tokenizing text, compiling a grammar,
    ``bad_words``): such a submission runs off the thread that serves the others."""
    lora = engine.lora
    new_adapter = (
        lora is not None
        and isinstance(lora_request, LoRARequest)
        and (
            lora.core.adapter_key(lora_request.lora_int_id) is None
            or lora_request.load_inplace  # a reload reads the weights: off the loop too
        )
    )
    has_ids = isinstance(prompt, dict) and "prompt_token_ids" in prompt
    return (
        new_adapter
        or bool(params.bad_words)
        or params.structured_outputs is not None
        or not (has_ids or isinstance(prompt, list))
    )


class AsyncLLM:
    """``AsyncLLM.from_engine_args(AsyncEngineArgs(...))``; ``async for out in
    engine.generate(prompt, params, request_id, lora_request=...)``."""

    def __init__(self, engine: LLMEngine, start_engine_loop: bool = True):
        self.engine = engine
        self.num_steps = 0  # steps the loop has taken (an idle engine takes none)
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self.dead_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
        if start_engine_loop:
            self._thread.start()

    @classmethod
    def from_engine_args(
        cls,
        engine_args: AsyncEngineArgs | EngineArgs,
        start_engine_loop: bool = True,
        usage_context: Any = None,
        stat_loggers: Any = None,
        enable_log_requests: bool = False,
        disable_log_stats: bool = False,
        client_addresses: Any = None,
        client_count: int = 1,
        client_index: int = 0,
    ) -> AsyncLLM:
        """vLLM's constructor; the arguments after ``start_engine_loop`` mean nothing here
        (one process, no usage reporting, no stat loggers)."""
        return cls(LLMEngine(engine_args), start_engine_loop)

    # -- the loop thread --

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stopped:
                self._wake.wait()
                self._wake.clear()  # before looking for work: a later submission sets it again
                while not self._stopped and engine.has_unfinished_requests():
                    outputs = engine.step()
                    self.num_steps += 1
                    self._dispatch(outputs)
        except BaseException as e:  # noqa: BLE001 - every consumer must hear of it
            self.dead_error = e
            with self._lock:
                streams = list(self._streams.values())
            for stream in streams:
                stream.put(EngineDeadError(f"the engine loop failed: {type(e).__name__}: {e}"))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        dispatch(outputs, self._streams, self._lock)

    # -- requests --

    async def generate(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        lora_request: LoRARequest | None = None,
        trace_headers: Any = None,
        priority: int = 0,
        tokenization_kwargs: dict[str, Any] | None = None,
        data_parallel_rank: int | None = None,
        tenant: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Submits a request and yields its outputs as ``sampling_params.output_kind`` asks
        (cumulative by default, deltas, or only the final one). Errors in the request are
        raised here, before anything is yielded. ``tenant``: as for
        ``LLMEngine.add_request``."""
        stream = await self.add_request(
            request_id,
            prompt,
            sampling_params,
            lora_request=lora_request,
            priority=priority,
            tokenization_kwargs=tokenization_kwargs,
            tenant=tenant,
        )
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        sampling_params: SamplingParams,
        *,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
        tokenization_kwargs: dict[str, Any] | None = None,
        tenant: str | None = None,
    ) -> RequestStream:
        """Submits a request and returns its outputs' stream once it is queued (errors in
        the request are raised here). Whoever holds the stream closes it
        (:meth:`RequestStream.close`): closing it before the end aborts the request."""
        self._check_alive()
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = stream
        try:
            await self._add_request(
                request_id,
                prompt,
                sampling_params,
                lora_request,
                tokenization_kwargs,
                priority,
                tenant,
            )
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        self._wake.set()
        return RequestStream(self, request_id, stream)

    def _release(self, request_id: str, finished: bool) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
        if not finished:  # cancelled, or the consumer left early: nobody wants the rest
            self.engine.abort_request(request_id)
            self._wake.set()

    async def _add_request(
        self, request_id, prompt, params, lora_request, tok_kwargs, priority, tenant=None
    ):
        args = (request_id, prompt, params, None, lora_request, tok_kwargs, None, priority)
        kwargs = {"tenant": tenant}
        if submission_grows(self.engine, prompt, params, lora_request):
            await asyncio.to_thread(self.engine.add_request, *args, **kwargs)
        else:
            self.engine.add_request(*args, **kwargs)

    async def abort(self, request_id: str | Iterable[str]) -> None:
        """Aborts requests; each one's consumer gets a last output with finish_reason
        'abort'."""
        self.engine.abort_request(request_id)
        self._wake.set()

    def _check_alive(self) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine loop failed: {self.dead_error}")
        if self._stopped:
            raise EngineDeadError("the engine was shut down")

    # -- adapters (their disk reads run off the event loop) --

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        return await asyncio.to_thread(self.engine.add_lora, lora_request)

    async def remove_lora(self, lora_id: int) -> bool:
        return self.engine.remove_lora(lora_id)

    async def list_loras(self) -> set[int]:
        return self.engine.list_loras()

    async def pin_lora(self, lora_id: int) -> bool:
        return await asyncio.to_thread(self.engine.pin_lora, lora_id)

    def lora_by_name(self, name: str) -> LoRARequest | None:
        """The adapter registered under ``name`` (the core's identity), or None."""
        return self.engine.lora_by_name(name)

    def registered_loras(self) -> list[LoRARequest]:
        return self.engine.registered_loras()

    async def reset_prefix_cache(self, device: Any = None) -> bool:
        """vLLM's: forgets every cached prefix."""
        return self.engine.reset_prefix_cache()

    def get_stats(self) -> dict[str, Any]:
        """The engine's queues, KV blocks and adapters, as plain data (a metrics snapshot)."""
        return self.engine.get_stats()

    # -- state --

    async def get_tokenizer(self, lora_request: LoRARequest | None = None) -> Tokenizer:
        return self.engine.get_tokenizer()

    @property
    def max_num_seqs(self) -> int:
        return self.engine.args.max_num_seqs

    @property
    def frontend(self) -> ModelFrontend:
        """What requests are checked against: tokenizer, input processor, context length."""
        return self.engine.frontend

    @property
    def model_config(self) -> ModelConfig:
        return self.engine.model_config

    async def get_model_config(self) -> ModelConfig:
        return self.engine.model_config

    async def is_tracing_enabled(self) -> bool:
        return False

    async def check_health(self) -> None:
        self._check_alive()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    @property
    def is_stopped(self) -> bool:
        return self._stopped

    @property
    def errored(self) -> bool:
        return self.dead_error is not None

    def shutdown(self) -> None:
        """Stops the loop thread (after the step it is in) and the adapter loader pool."""
        self._stopped = True
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if self.engine.lora is not None:
            self.engine.lora.close()


class RequestStream:
    """One request's outputs, in order: ``async for out in stream``. ``close()`` before the
    last output aborts the request (its KV blocks are freed); after it, does nothing."""

    replica: str | None = None  # one engine: no replica to name

    def __init__(self, llm: AsyncLLM, request_id: str, stream: _Stream):
        self.request_id = request_id
        self.finished = False
        self._llm, self._stream, self._closed = llm, stream, False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        item = await self._stream.queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:
            self.finished = True
            self.close()
        return item

    def interrupt(self, error: BaseException) -> None:
        """Ends the stream with ``error``: its consumer's next wait raises it (and so
        closes the stream, aborting the request)."""
        if not self._closed and not self.finished:
            self._stream.put(error)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._llm._release(self.request_id, self.finished)
