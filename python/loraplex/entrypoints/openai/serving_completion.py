"""``/v1/completions``: vLLM's behaviour, incl. ``echo`` with the prompt's logprobs (and
``max_tokens=0``, lm-eval's loglikelihood request), ``prompt_logprobs``,
``return_token_ids`` and ``return_tokens_as_token_ids``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.entrypoints.openai.errors import APIError, error_body
from loraplex.entrypoints.openai.protocol import CompletionRequest
from loraplex.entrypoints.openai.serving_engine import (
    DONE,
    ServingContext,
    check_finished,
    replica_headers,
    sse,
    usage,
)
from loraplex.entrypoints.openai.serving_models import adapter_for, warn_ignored


def completion_prompts(prompt) -> list[Any]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) for p in prompt):
        return [{"prompt_token_ids": list(p)} for p in prompt]
    raise APIError(400, "prompt: a string, a list of strings, or token ids", "prompt")


def prompt_logprobs_json(ctx: ServingContext, entries, as_ids) -> list[Any] | None:
    """vLLM's ``prompt_logprobs``: per prompt position, None for the first, else token id
    -> {logprob, rank, decoded_token}."""
    if entries is None:
        return None
    return [
        None
        if e is None
        else {
            str(t): dict(logprob=lp.logprob, rank=lp.rank, decoded_token=ctx.token_str(t, as_ids))
            for t, lp in e.items()
        }
        for e in entries
    ]


class _Logprobs:
    """OpenAI's completion ``logprobs`` object, built up token by token."""

    def __init__(self, ctx: ServingContext, as_ids: bool | None, offset: int = 0):
        self.ctx, self.as_ids, self.offset = ctx, as_ids, offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token_ids, entries) -> _Logprobs:
        for tid, entry in zip(token_ids, entries):
            piece = self.ctx.token_str(tid, self.as_ids)
            self.tokens.append(piece)
            if entry is None:  # the prompt's first token: nothing before it
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
            else:
                self.token_logprobs.append(entry[tid].logprob if tid in entry else None)
                top = {self.ctx.token_str(t, self.as_ids): lp.logprob for t, lp in entry.items()}
                self.top_logprobs.append(top)
            self.text_offset.append(self.offset)
            self.offset += len(self.ctx.tokenizer.decode([tid], skip_special_tokens=False))
        return self

    def json(self) -> dict[str, Any]:
        return dict(
            tokens=self.tokens,
            token_logprobs=self.token_logprobs,
            top_logprobs=self.top_logprobs,
            text_offset=self.text_offset,
        )


async def create_completion(ctx: ServingContext, body: CompletionRequest, request: Request):
    warn_ignored(body, "completions")
    body.check_supported()
    adapter = await adapter_for(ctx, body.model)
    echo_only = bool(body.echo) and body.max_tokens == 0  # the prompt's logprobs alone
    logprobs = body.logprobs
    prompt_logprobs = body.prompt_logprobs
    if body.echo and logprobs is not None:
        prompt_logprobs = max(logprobs, prompt_logprobs or 0)
    max_tokens = 1 if echo_only else body.max_tokens
    try:
        params = body.sampling_params(max_tokens, logprobs, prompt_logprobs)
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from None
    await ctx.compile_grammar(params.structured_outputs, body.structured()[1])
    ctx.apply_defaults(body, params)
    rid = ctx.request_id("cmpl", body.request_id, request)
    prompts = completion_prompts(body.prompt)
    inputs = [await ctx.off_loop(ctx.prepare, rid, p, params) for p in prompts]
    streams = await ctx.submit_all(
        rid, inputs, params, adapter, body.priority, body.cache_salt, body.user
    )
    model, created = body.model or ctx.options.base, int(time.time())
    as_ids = body.return_tokens_as_token_ids

    def choice_json(i: int, out, c, first: bool, offset: int) -> tuple[dict, int]:
        """One choice (or one chunk of it); its text's end offset."""
        token_ids = [] if echo_only else list(c.token_ids)
        text = "" if echo_only else c.text
        lp = None
        if first and body.echo:
            text = (out.prompt or ctx.tokenizer.decode(out.prompt_token_ids)) + text
        if logprobs is not None:
            builder = _Logprobs(ctx, as_ids, offset)
            if first and body.echo:
                entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                builder.add(out.prompt_token_ids, entries)
            if not echo_only and c.logprobs is not None:
                builder.add(c.token_ids, c.logprobs)
            lp = builder.json()
        choice: dict[str, Any] = dict(
            index=i * params.n + c.index,
            text=text,
            logprobs=lp,
            finish_reason=c.finish_reason,
            stop_reason=c.stop_reason,
        )
        if first and body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = prompt_logprobs_json(ctx, out.prompt_logprobs, as_ids)
        if body.return_token_ids:
            if first:
                choice["prompt_token_ids"] = list(out.prompt_token_ids)
            choice["token_ids"] = token_ids
        return choice, offset + len(text)

    def generated(c) -> int:
        return 0 if echo_only else len(c.token_ids)

    if not body.stream:
        outs = await ctx.collect(adapter, streams, params, request)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, out in enumerate(outs):
            check_finished(out)
            prompt_tokens += len(out.prompt_token_ids)
            for c in out.outputs:
                choices.append(choice_json(i, out, c, True, 0)[0])
                completion_tokens += generated(c)
        body_out = dict(
            id=rid,
            object="text_completion",
            created=created,
            model=model,
            choices=choices,
            usage=usage(prompt_tokens, completion_tokens, ctx.cached(outs)),
        )
        return JSONResponse(body_out, headers=replica_headers(streams))

    opts = body.stream_options
    include_usage = bool(opts and opts.include_usage) or ctx.options.enable_force_include_usage
    continuous = include_usage and bool(opts and opts.continuous_usage_stats)

    async def merged() -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, output or the APIError that cut it) as they come, over every
        prompt's stream (one stream: no task in between)."""
        if len(streams) == 1:
            try:
                async for out in ctx.outputs(adapter, streams[0], params):
                    yield 0, out
            except APIError as e:  # its replica was lost mid-stream, or a shutdown
                yield 0, e
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream) -> None:
            try:
                async for out in ctx.outputs(adapter, stream, params):
                    await queue.put((i, out))
            except APIError as e:
                await queue.put((i, e))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            live = len(tasks)
            while live:
                i, out = await queue.get()
                if out is None:
                    live -= 1
                else:
                    yield i, out
        finally:
            for t in tasks:
                t.cancel()

    async def events() -> AsyncIterator[str]:
        counts = {"prompt": 0, "completion": 0, "cached": 0}
        base = dict(id=rid, object="text_completion", created=created, model=model)
        try:
            seen_prompt: set[int] = set()
            offsets: dict[int, int] = {}
            async for i, out in merged():
                if isinstance(out, APIError):
                    yield sse(error_body(out.status, out.message))
                    continue
                if out.error:
                    yield sse(error_body(400, out.error))  # ended by the engine
                    continue
                if i not in seen_prompt:
                    seen_prompt.add(i)
                    counts["prompt"] += len(out.prompt_token_ids)
                    counts["cached"] += ctx.cached([out])
                for c in out.outputs:
                    index = i * params.n + c.index
                    first = index not in offsets
                    if not first and not c.token_ids and c.finish_reason is None:
                        continue
                    if echo_only and not first and c.finish_reason is None:
                        continue
                    counts["completion"] += generated(c)
                    choice, offsets[index] = choice_json(i, out, c, first, offsets.get(index, 0))
                    chunk = dict(base, choices=[choice])
                    if include_usage:
                        chunk["usage"] = (
                            usage(counts["prompt"], counts["completion"], counts["cached"])
                            if continuous
                            else None
                        )
                    yield sse(chunk)
            if include_usage:
                yield sse(
                    dict(
                        base,
                        choices=[],
                        usage=usage(counts["prompt"], counts["completion"], counts["cached"]),
                    )
                )
            yield DONE
        finally:
            for s in streams:
                s.close()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers=replica_headers(streams)
    )
