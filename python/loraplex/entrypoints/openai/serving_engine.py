"""What completions and chat share: the server's options, input work moved off the event
loop (bounded), a request's submission with vLLM's length checks, its outputs counted in
the metrics, whole responses collected with disconnects noticed, and SSE framing."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request

from loraplex.engine.async_llm import EngineDeadError
from loraplex.engine.input_processor import with_truncation
from loraplex.engine.llm_engine import MAX_TENANT_LEN
from loraplex.entrypoints.openai.engine_client import REPLICA_HEADER, Adapter, EngineClient
from loraplex.entrypoints.openai.errors import APIError
from loraplex.entrypoints.openai.metrics import Metrics
from loraplex.outputs import RequestOutput

logger = logging.getLogger("loraplex.serve")
T = TypeVar("T")
DISCONNECT_POLL_S = 0.5


@dataclass
class ServeOptions:
    """The server's flags that shape how a request is read and answered."""

    served_names: list[str]
    model: str
    chat_template: str | None = None
    chat_template_content_format: str = "string"
    trust_request_chat_template: bool = False
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    response_role: str = "assistant"
    return_tokens_as_token_ids: bool = False
    enable_force_include_usage: bool = False
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    log_requests: bool = False
    log_outputs: bool = False
    max_log_len: int | None = None
    max_body_bytes: int = 32 << 20
    input_workers: int = 2
    lora_roots: list[Path] = field(default_factory=list)
    runtime_lora_updating: bool = False
    lora_discovery: bool = False
    lora_sources: frozenset[str] = frozenset({"local"})  # what /v1/load_lora_adapter may load
    resolvers: list[tuple[str, Any]] = field(default_factory=list)  # (name, LoRAResolver)
    enable_prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens
    api_key: list[bytes] | None = None
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = False
    tenants_from_user: bool = False  # scheduling_policy=fair: the body's `user` is its client

    @property
    def base(self) -> str:
        return self.served_names[0]


class ServingContext:
    """The state every serving module reads: options, the engine client, the metrics, and
    the pool where input work runs."""

    def __init__(self, client: EngineClient, options: ServeOptions, metrics: Metrics):
        self.client, self.options, self.metrics = client, options, metrics
        self.frontend = client.frontend
        self.tokenizer = client.frontend.tokenizer
        self.created = int(time.time())
        self._live: set[Any] = set()  # streams being answered (cut at shutdown)
        self._pool = ThreadPoolExecutor(options.input_workers, thread_name_prefix="lp-input")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the input pool (tokenizing, templates, checks that grow with
        the input): the event loop only waits."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def cut_all(self) -> None:
        """Ends every stream still being answered with a 503 (the server is stopping):
        each streamed response sends it as an error event, then ``[DONE]``."""
        for stream in list(self._live):
            interrupt = getattr(stream, "interrupt", None)
            if interrupt is not None:
                interrupt(APIError(503, "the server is shutting down; the request was aborted"))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def apply_defaults(self, body, params) -> None:
        """The model's generation defaults (``--generation-config``) for the sampling
        fields the request left unset."""
        for key, value in self.options.generation_defaults.items():
            if key == "max_tokens":
                asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
                if asked is None:
                    params.max_tokens = value
            elif getattr(body, key, None) is None:
                setattr(params, key, value)

    def request_id(self, prefix: str, given: str | None, request: Request | None) -> str:
        header = request.headers.get("x-request-id") if request is not None else None
        return f"{prefix}-{given or header or uuid.uuid4().hex}"

    def log_request(self, request_id: str, prompt: Any, params: Any, adapter) -> None:
        if not self.options.log_requests:
            return
        shown = str(prompt)
        limit = self.options.max_log_len
        if limit is not None:
            shown = shown[:limit]
        name = adapter.lora_name if adapter is not None else None
        logger.info(
            "Received request %s: prompt: %r, params: %s, lora_request: %s",
            request_id,
            shown,
            params,
            name,
        )

    def log_output(self, out: RequestOutput) -> None:
        limit = self.options.max_log_len
        for c in out.outputs:
            logger.info(
                "Generated response %s (choice %d): output: %r, finish_reason: %s",
                out.request_id,
                c.index,
                c.text if limit is None else c.text[:limit],
                c.finish_reason,
            )

    async def compile_grammar(self, so, where: str) -> None:
        """Compiles a request's structured output (off the event loop; cached, so the
        engine's own compile at submission finds it): a 400 naming ``where``, the body's
        field, when it does not compile."""
        if so is None:
            return
        try:
            await self.off_loop(self.frontend.grammars.compile, where, so)
        except ValueError as e:
            raise APIError(400, str(e), where) from None

    def prepare(self, request_id: str, prompt: Any, params) -> dict[str, Any]:
        """Tokenizes and checks one prompt (on the input pool): its engine input. As
        vLLM's server does, a prompt and ``max_tokens`` past the context are refused."""
        if params.n > self.client.max_num_seqs:
            raise APIError(
                400,
                f"n={params.n} is more than this server runs at once (max_num_seqs="
                f"{self.client.max_num_seqs})",
                "n",
            )
        processor = self.frontend.processor
        if isinstance(prompt, str):  # a token is at least one byte: a cheap bound first
            limit = self.frontend.max_model_len
            if params.truncate_prompt_tokens is None and len(prompt) > 64 * limit:
                raise APIError(
                    400,
                    f"This model's maximum context length is {limit} tokens; the prompt "
                    f"({len(prompt)} characters) is far longer",
                    "prompt",
                )
        try:
            text, ids = processor.tokenize(request_id, prompt, with_truncation(None, params))
            processor.check_params(request_id, params)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e)) from None
        limit = self.frontend.max_model_len
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, "
                f"{params.max_tokens} in the completion). Reduce the prompt or max_tokens.",
                "max_tokens",
            )
        return (
            {"prompt_token_ids": ids} if text is None else {"prompt_token_ids": ids, "prompt": text}
        )

    async def submit_all(
        self,
        request_id: str,
        inputs: list[dict],
        params,
        adapter,
        priority,
        cache_salt=None,
        user=None,
    ):
        """Queues each prepared input (with the body's ``cache_salt``: only requests with
        the same salt share cached prefixes; under fair share, its ``user`` as the tenant
        whose share they count against); a refusal aborts those queued before it."""
        tenant = None
        if self.options.tenants_from_user and user is not None:
            if not user or len(user) > MAX_TENANT_LEN:
                raise APIError(
                    400,
                    f"'user' names the tenant under scheduling_policy=fair: a non-empty "
                    f"string of at most {MAX_TENANT_LEN} characters (got {len(user)})",
                    "user",
                )
            tenant = user
        streams = []
        try:
            for i, tokens in enumerate(inputs):
                if cache_salt is not None:
                    tokens = {**tokens, "cache_salt": cache_salt}
                rid = request_id if len(inputs) == 1 else f"{request_id}-{i}"
                self.log_request(
                    rid, tokens.get("prompt", tokens["prompt_token_ids"]), params, adapter
                )
                stream = await self.client.generate(rid, tokens, params, adapter, priority, tenant)
                stream.tenant = tenant  # for its metrics
                streams.append(stream)
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams

    async def outputs(
        self, adapter: Adapter | None, stream, params
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs, counted in the metrics; leaving early aborts it."""
        name = adapter.lora_name if adapter is not None else self.options.base
        tracker = self.metrics.request(name, getattr(stream, "tenant", None))
        self._live.add(stream)
        try:
            async for out in stream:
                tracker.observe(out)
                if out.finished and self.options.log_outputs:
                    self.log_output(out)
                yield out
        except EngineDeadError as e:  # mid-stream: the stream's error event, then [DONE]
            raise APIError(503, str(e)) from None
        finally:
            self._live.discard(stream)
            stream.close()
            tracker.done(getattr(stream, "replica", None), params)

    async def collect(self, adapter, streams, params, request: Request) -> list[RequestOutput]:
        """Runs whole (not streamed) requests to the end; a client that disconnects aborts
        them."""

        async def drain(stream) -> RequestOutput:
            last = None
            async for out in self.outputs(adapter, stream, params):
                last = out
            return last

        tasks = [asyncio.ensure_future(drain(s)) for s in streams]
        gathered = asyncio.gather(*tasks)
        try:
            while True:
                done, _ = await asyncio.wait({gathered}, timeout=DISCONNECT_POLL_S)
                if done:
                    return gathered.result()
                if await request.is_disconnected():
                    raise APIError(499, "the client disconnected")
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                s.close()
            if not gathered.done():
                gathered.cancel()
            await asyncio.gather(gathered, return_exceptions=True)

    def cached(self, outs) -> int:
        """The prompt tokens ``outs`` found in the prefix cache, for ``usage`` (0 unless
        ``--enable-prompt-tokens-details``)."""
        if not self.options.enable_prompt_tokens_details:
            return 0
        return sum(out.num_cached_tokens for out in outs)

    def token_str(self, token_id: int, as_ids: bool | None) -> str:
        if as_ids if as_ids is not None else self.options.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage; ``prompt_tokens_details.cached_tokens`` when some prompt tokens were
    found in the prefix cache (pass 0 unless ``--enable-prompt-tokens-details``, as vLLM)."""
    total = prompt_tokens + completion_tokens
    out: dict[str, Any] = dict(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total
    )
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def check_finished(out: RequestOutput) -> None:
    if out.error:  # the engine ended it with an error (a bad adapter, a failed batch)
        raise APIError(400, out.error)


def replica_headers(streams) -> dict[str, str] | None:
    """The header naming the replica(s) that served a response (none for one engine)."""
    names = sorted({s.replica for s in streams if getattr(s, "replica", None)})
    return {REPLICA_HEADER: ",".join(names)} if names else None


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"
