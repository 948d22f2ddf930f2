"""``/v1/chat/completions``: messages (content parts read as vLLM reads them) through the
chat template (``--chat-template``, or the model's; a request's own only with
``--trust-request-chat-template``), then generation; ``echo``, logprobs, ``prompt_logprobs``,
``return_token_ids`` and the response role as vLLM gives them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.entrypoints.openai.chat_utils import parse_messages, render_chat
from loraplex.entrypoints.openai.errors import APIError, error_body
from loraplex.entrypoints.openai.protocol import ChatCompletionRequest
from loraplex.entrypoints.openai.serving_completion import prompt_logprobs_json
from loraplex.entrypoints.openai.serving_engine import (
    DONE,
    ServingContext,
    check_finished,
    replica_headers,
    sse,
    usage,
)
from loraplex.entrypoints.openai.serving_models import adapter_for, warn_ignored
from loraplex.entrypoints.openai.tool_parsers import (
    PARSERS,
    ToolCallStream,
    named_schema,
    required_schema,
    tool_mode,
)
from loraplex.sampling_params import StructuredOutputsParams


def chat_template_of(ctx: ServingContext, body) -> str | None:
    """The template to render with: a request's own only where the server trusts them."""
    if body.chat_template is not None:
        if not ctx.options.trust_request_chat_template:
            raise APIError(
                400,
                "chat_template: a request's own chat template is refused unless the server "
                "runs with --trust-request-chat-template",
                "chat_template",
            )
        return body.chat_template
    return ctx.options.chat_template


def render_request(ctx: ServingContext, body, tokenize: bool, tools: list | None = None):
    """``body``'s messages as text or ids (runs on the input pool), ``tools`` given to the
    template (the body's unless said)."""
    messages = parse_messages(body.messages, ctx.options.chat_template_content_format)
    kwargs = {**ctx.options.default_chat_template_kwargs, **(body.chat_template_kwargs or {})}
    effort = getattr(body, "reasoning_effort", None)
    if effort is not None:
        kwargs.setdefault("reasoning_effort", effort)
    return render_chat(
        ctx.tokenizer,
        messages,
        template=chat_template_of(ctx, body),
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        tools=body.tools if tools is None else tools or None,
        documents=body.documents,
        template_kwargs=kwargs,
        max_chars=ctx.options.max_body_bytes * 4,
        tokenize=tokenize,
    )


def _logprobs(ctx: ServingContext, token_ids, entries, top: int, as_ids) -> dict[str, Any]:
    content = []
    for tid, entry in zip(token_ids, entries):
        piece = ctx.token_str(tid, as_ids)
        ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:top]
        content.append(
            dict(
                token=piece,
                logprob=entry[tid].logprob if tid in entry else None,
                bytes=list(piece.encode()),
                top_logprobs=[
                    dict(
                        token=(p := ctx.token_str(t, as_ids)),
                        logprob=lp.logprob,
                        bytes=list(p.encode()),
                    )
                    for t, lp in ranked
                ],
            )
        )
    return {"content": content}


async def create_chat_completion(
    ctx: ServingContext, body: ChatCompletionRequest, request: Request
):
    warn_ignored(body, "chat completions")
    body.check_supported()
    mode, tool_name = tool_mode(body, ctx.options.enable_auto_tool_choice)
    parser_cls = PARSERS.get(ctx.options.tool_call_parser or "")
    adapter = await adapter_for(ctx, body.model)
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = body.top_logprobs or 0
    try:
        params = body.sampling_params(
            max_tokens, top if body.logprobs else None, body.prompt_logprobs
        )
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from None
    so, where = body.structured()
    if mode in ("required", "named"):  # the calls' form, enforced by a schema of the tools
        if so is not None:
            raise APIError(
                400, f"{where} cannot be given with tool_choice={body.tool_choice!r:.100}", where
            )
        if mode == "required":
            schema = required_schema(body.tools, body.parallel_tool_calls is not False)
        else:
            schema = named_schema(body.tools, tool_name)
        so, where = StructuredOutputsParams(json=schema), "tools"
        params.structured_outputs = so
    await ctx.compile_grammar(so, where)
    ctx.apply_defaults(body, params)
    rid = ctx.request_id("chatcmpl", body.request_id, request)
    exclude = mode == "none" and ctx.options.exclude_tools_when_tool_choice_none
    ids = await ctx.off_loop(render_request, ctx, body, True, [] if exclude else None)
    tokens = await ctx.off_loop(ctx.prepare, rid, {"prompt_token_ids": ids}, params)
    (stream,) = await ctx.submit_all(
        rid, [tokens], params, adapter, body.priority, body.cache_salt, body.user
    )
    model, created = body.model or ctx.options.base, int(time.time())
    num_prompt = len(tokens["prompt_token_ids"])
    last = body.messages[-1] if body.messages else {}
    role = ctx.options.response_role if body.add_generation_prompt else last.get("role")
    echoed = ""
    if body.echo and last.get("role") == role:
        (parsed,) = parse_messages([last])
        echoed = parsed["content"] if isinstance(parsed["content"], str) else ""
    as_ids = body.return_tokens_as_token_ids

    def logprobs_of(c):
        if not body.logprobs or c.logprobs is None:
            return None
        return _logprobs(ctx, c.token_ids, c.logprobs, top, as_ids)

    def extras(out, c, first: bool) -> dict[str, Any]:
        more: dict[str, Any] = {}
        if body.return_token_ids:
            more["token_ids"] = list(c.token_ids)
        return more

    def top_extras(out) -> dict[str, Any]:
        more: dict[str, Any] = {}
        if body.prompt_logprobs is not None:
            more["prompt_logprobs"] = prompt_logprobs_json(ctx, out.prompt_logprobs, as_ids)
        if body.return_token_ids:
            more["prompt_token_ids"] = list(out.prompt_token_ids)
        return more

    def tool_stream() -> ToolCallStream:
        return ToolCallStream(mode, parser_cls() if parser_cls else None, tool_name)

    def finish_reason(c, calls) -> str | None:
        """vLLM's: 'tool_calls' where auto or required calls were made."""
        return "tool_calls" if calls and mode in ("auto", "required") else c.finish_reason

    if not body.stream:
        (out,) = await ctx.collect(adapter, [stream], params, request)
        check_finished(out)
        choices = []
        for c in out.outputs:
            tools = tool_stream()
            content = tools.feed(c.text)
            rest, calls = tools.finish()
            message: dict[str, Any] = dict(role=role, content=echoed + content + rest)
            if calls:
                message["content"] = message["content"] or None
                message["tool_calls"] = [call.to_json() for call in calls]
            choices.append(
                dict(
                    index=c.index,
                    message=message,
                    logprobs=logprobs_of(c),
                    finish_reason=finish_reason(c, calls),
                    stop_reason=c.stop_reason,
                    **extras(out, c, True),
                )
            )
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        body_out = dict(
            id=rid,
            object="chat.completion",
            created=created,
            model=model,
            choices=choices,
            usage=usage(num_prompt, completion_tokens, ctx.cached([out])),
            **top_extras(out),
        )
        return JSONResponse(body_out, headers=replica_headers([stream]))

    opts = body.stream_options
    include_usage = bool(opts and opts.include_usage) or ctx.options.enable_force_include_usage
    continuous = include_usage and bool(opts and opts.continuous_usage_stats)

    async def events() -> AsyncIterator[str]:
        base = dict(id=rid, object="chat.completion.chunk", created=created, model=model)
        started: set[int] = set()
        completion_tokens = cached = 0
        tools: dict[int, ToolCallStream] = {}

        def chunk(choice: dict[str, Any]) -> str:
            payload = dict(base, choices=[choice])
            if include_usage:
                payload["usage"] = (
                    usage(num_prompt, completion_tokens, cached) if continuous else None
                )
            return sse(payload)

        try:
            first_out = True
            async for out in ctx.outputs(adapter, stream, params):
                cached = ctx.cached([out])
                if out.error:
                    yield sse(error_body(400, out.error))  # ended by the engine
                    continue
                for c in out.outputs:
                    if c.index not in started:
                        started.add(c.index)
                        delta = dict(role=role, content=echoed)
                        first = dict(index=c.index, delta=delta, logprobs=None, finish_reason=None)
                        if first_out:
                            first.update(top_extras(out))
                        yield chunk(first)
                    if not c.text and not c.token_ids and c.finish_reason is None:
                        continue
                    completion_tokens += len(c.token_ids)
                    ts = tools.setdefault(c.index, tool_stream())
                    text, calls = ts.feed(c.text), []
                    if c.finish_reason is not None:
                        rest, calls = ts.finish()
                        text += rest
                    delta = dict(content=text) if text or c.finish_reason is None else {}
                    if calls:  # each call whole, in a chunk before the one that finishes
                        if delta:
                            yield chunk(dict(index=c.index, delta=delta, finish_reason=None))
                        deltas = [dict(index=k, **call.to_json()) for k, call in enumerate(calls)]
                        tool_delta = dict(tool_calls=deltas)
                        yield chunk(dict(index=c.index, delta=tool_delta, finish_reason=None))
                        delta = {}
                    choice = dict(
                        index=c.index,
                        delta=delta,
                        logprobs=logprobs_of(c),
                        finish_reason=finish_reason(c, calls),
                        stop_reason=c.stop_reason,
                        **extras(out, c, False),
                    )
                    yield chunk(choice)
                first_out = False
            if include_usage:
                yield sse(
                    dict(base, choices=[], usage=usage(num_prompt, completion_tokens, cached))
                )
            yield DONE
        except APIError as e:  # its replica was lost mid-stream
            yield sse(error_body(e.status, e.message))
            yield DONE
        finally:
            stream.close()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers=replica_headers([stream])
    )
