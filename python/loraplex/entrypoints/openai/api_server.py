"""``loraplex serve``: an OpenAI-compatible HTTP server on ``AsyncLLM`` (FastAPI + uvicorn, as
vLLM's). ``model`` in a request names the served base model or an adapter; adapters come from
``--lora-modules`` and, with ``--allow-runtime-lora-updating``, from
``/v1/load_lora_adapter`` (only inside ``--lora-root`` folders)."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import loraplex
from loraplex._core import (
    AdapterInUseError,
    LoraplexError,
    LoRARequest,
    UnknownAdapterError,
)
from loraplex.engine.arg_utils import AsyncEngineArgs
from loraplex.engine.async_llm import AsyncLLM, EngineDeadError, RequestStream
from loraplex.engine.input_processor import with_truncation
from loraplex.entrypoints.openai.metrics import Metrics, engine_snapshot, snapshot_metrics
from loraplex.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from loraplex.errors import InvalidAdapterError
from loraplex.outputs import RequestOutput

OPEN_ROUTES = {"/health", "/ping", "/metrics"}  # reachable without the API key
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers


_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    503: "ServiceUnavailableError",
}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


class Server:
    """What the routes serve from: the served names, the tokenizer and input checks, the
    adapters known by name, and where requests run. This one runs them on an ``AsyncLLM`` in
    this process; ``ClusterServer`` (``entrypoints/ray/cluster.py``) on engine replicas."""

    replica_header = "x-loraplex-replica"  # names the replica that served a response

    def __init__(self, engine: AsyncLLM, args: argparse.Namespace):
        self.engine = engine
        self._init(args, engine.engine.args.max_num_seqs)
        core = engine.engine
        self.tokenizer, self.processor = core.get_tokenizer(), core.processor
        self.max_model_len = core.max_model_len

    def _init(self, args: argparse.Namespace, max_num_seqs: int) -> None:
        self.args = args
        self.max_num_seqs = max_num_seqs
        self.served_names: list[str] = args.served_model_name or [args.model]
        self.base = self.served_names[0]
        self.loras: dict[str, LoRARequest] = {}
        self.next_id = 1
        self.roots = [Path(r).resolve() for r in (args.lora_root or [])]
        env = os.environ.get(RUNTIME_LORA_ENV, "").lower() in ("1", "true")
        self.runtime_updates = bool(args.allow_runtime_lora_updating or env)
        key = args.api_key or os.environ.get("LORAPLEX_API_KEY") or None
        self.api_key = key.encode() if key else None
        self.adapter_lock = asyncio.Lock()
        self.metrics = Metrics(self)
        self.created = int(time.time())

    def new_id(self) -> int:
        taken = {lora.lora_int_id for lora in self.loras.values()}
        while self.next_id in taken:
            self.next_id += 1
        lora_id, self.next_id = self.next_id, self.next_id + 1
        return lora_id

    def _choose_id(self, name: str, old: LoRARequest | None, wanted: int | None) -> int:
        if wanted is None:
            return old.lora_int_id if old is not None else self.new_id()
        if old is not None and old.lora_int_id != wanted:
            raise APIError(
                400,
                f"adapter '{name}' has lora_int_id {old.lora_int_id}, not {wanted}",
                "lora_int_id",
            )
        for other, lora in self.loras.items():
            if other != name and lora.lora_int_id == wanted:
                raise APIError(
                    400, f"lora_int_id {wanted} is held by adapter '{other}'", "lora_int_id"
                )
        return wanted

    async def lora_for(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's ``model`` names (None: the base); 404 for any other."""
        if model is None or model in self.served_names:
            return None
        if model in self.loras:
            return self.loras[model]
        path = find_adapter(model, self.roots)  # a folder of that name in a --lora-root
        if path is not None:
            try:
                await self.add_adapter(model, path, False, source="discovered")
            except APIError as e:
                if model not in self.loras:  # not loaded meanwhile by another request
                    raise APIError(400, e.message, "model") from None
            return self.loras[model]
        raise APIError(404, f"The model `{model}` does not exist.", "model")

    async def submit(self, request_id: str, tokens: dict, params, lora, priority: int):
        """Queues one checked request; its stream of outputs (``close()`` aborts it)."""
        return await self.engine.add_request(
            request_id, tokens, params, lora_request=lora, priority=priority
        )

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def adapters(self) -> list[tuple[str, str]]:
        """(name, path) of every adapter served by name."""
        return [(name, lora.lora_path) for name, lora in self.loras.items()]

    async def add_adapter(
        self,
        name: str,
        path: Path,
        inplace: bool,
        lora_int_id: int | None = None,
        source: str = "runtime",
    ) -> str | None:
        """Loads (or, ``inplace``, reloads) an adapter under ``name`` (with ``lora_int_id``
        if given: refused if another adapter has it); the replica that loaded it (None
        here: one engine)."""
        async with self.adapter_lock:
            old = self.loras.get(name)
            if old is not None and not inplace:
                raise APIError(
                    400, f"The lora adapter '{name}' has already been loaded.", "lora_name"
                )
            lora_id = self._choose_id(name, old, lora_int_id)
            lora = LoRARequest(name, lora_id, str(path), load_inplace=old is not None)
            start = time.perf_counter()
            try:
                await self.engine.add_lora(lora)
            except (InvalidAdapterError, ValueError, LoraplexError) as e:
                if old is None:
                    await self.engine.remove_lora(lora_id)  # no residue of a failed load
                raise APIError(400, f"cannot load adapter '{name}': {e}", "lora_path") from None
            self.metrics.loaded(name, source, time.perf_counter() - start)
            self.loras[name] = LoRARequest(name, lora_id, str(path))
        return None

    async def remove_adapter(self, name: str) -> None:
        """Refuses (409) while requests use the adapter: unload never waits on or aborts
        them."""
        async with self.adapter_lock:
            lora = self.loras.get(name)
            if lora is None:
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
            try:
                await self.engine.remove_lora(lora.lora_int_id)
            except AdapterInUseError as e:
                raise APIError(409, f"adapter '{name}' is in use: {e}", "lora_name") from None
            except UnknownAdapterError:
                pass  # already gone from the engine: forget the name too
            del self.loras[name]

    async def replicas(self) -> list[dict[str, Any]]:
        """The cluster view: one engine here, what it holds (as a replica reports it)."""
        state = engine_snapshot(self.engine.engine, self._lora_ids())
        return [dict(state, replica_id="local", pid=os.getpid())]

    def _lora_ids(self) -> dict[str, int]:
        return {name: lora.lora_int_id for name, lora in list(self.loras.items())}

    async def refresh_metrics(self) -> None:
        """Before a scrape (the engine here is read at scrape time: nothing to fetch)."""

    def engine_metrics(self):
        """Gauges read from the engine at scrape time."""
        return snapshot_metrics({None: engine_snapshot(self.engine.engine, self._lora_ids())})

    def shutdown(self) -> None:
        self.engine.shutdown()

    def authorized(self, request: Request) -> bool:
        if self.api_key is None or request.url.path in OPEN_ROUTES:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        return hmac.compare_digest(given, self.api_key)  # constant time


def build_app(server: Server) -> FastAPI:
    app = FastAPI(title="loraplex", version=loraplex.__version__)
    app.state.server = server

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if not server.authorized(request):
            return error_response(401, "Unauthorized: a valid API key is required")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError):
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        first = e.errors()[0].get("loc", ()) if e.errors() else ()
        param = ".".join(str(p) for p in first if p != "body") or None
        return error_response(400, "; ".join(problems), param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.get("/health")
    @app.get("/ping")  # vLLM's (SageMaker's) name for the same check, by GET or POST
    @app.post("/ping")
    async def health() -> Response:
        try:
            await server.check_health()
        except EngineDeadError as e:
            return error_response(503, str(e))
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": loraplex.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        await server.refresh_metrics()
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        root = str(server.args.model)
        max_len = server.max_model_len
        card = dict(object="model", created=server.created, owned_by="loraplex")
        data = [
            dict(id=name, root=root, parent=None, max_model_len=max_len, **card)
            for name in server.served_names
        ]
        for name, path in await server.adapters():
            data.append(dict(id=name, root=path, parent=server.base, **card))
        return {"object": "list", "data": data}

    @app.get("/v1/replicas")
    async def replicas():
        """Which replica holds which adapter (device slot / host tier), its queues and KV
        blocks."""
        return {"object": "list", "data": await server.replicas()}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serve_completion(server, body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await serve_chat(server, body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        return await serve_tokenize(server, body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return await serve_detokenize(server, body)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoRAAdapterRequest):
        return await load_adapter(server, body)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLoRAAdapterRequest):
        return await unload_adapter(server, body)

    return app


# -- generation --


def _bad_request(e: Exception) -> APIError:
    return APIError(400, str(e))


async def _submit(server: Server, prompt, params, lora, priority) -> RequestStream:
    """Queues one request; errors in its input are 400s, raised before anything streams.
    As vLLM's server does, a prompt and ``max_tokens`` past the context are refused."""
    request_id = uuid.uuid4().hex
    if params.n > server.max_num_seqs:  # a client's n is bounded: its sequences are built
        raise APIError(  # at once (LLM takes any n: there the caller chose it)
            400,
            f"n={params.n} is more than this server runs at once (max_num_seqs="
            f"{server.max_num_seqs})",
            "n",
        )
    try:
        text, ids = server.processor.tokenize(request_id, prompt, with_truncation(None, params))
        limit = server.max_model_len
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, "
                f"{params.max_tokens} in the completion). Reduce the prompt or max_tokens.",
                "max_tokens",
            )
        tokens = (
            {"prompt_token_ids": ids} if text is None else {"prompt_token_ids": ids, "prompt": text}
        )
        return await server.submit(request_id, tokens, params, lora, priority)
    except (ValueError, TypeError, LoraplexError) as e:
        raise _bad_request(e) from None
    except EngineDeadError as e:
        raise APIError(503, str(e)) from None


async def _submit_all(server: Server, prompts, params, lora, priority) -> list[RequestStream]:
    streams: list[RequestStream] = []
    try:
        for p in prompts:
            streams.append(await _submit(server, p, params, lora, priority))
    except BaseException:
        for s in streams:
            s.close()  # the prompts queued before the bad one are aborted
        raise
    return streams


async def _outputs(server: Server, lora, stream: RequestStream) -> AsyncIterator[RequestOutput]:
    """The request's outputs, counted in the metrics; leaving early aborts the request."""
    tracker = server.metrics.request(lora)
    try:
        async for out in stream:
            tracker.observe(out)
            yield out
    finally:
        stream.close()
        tracker.done(getattr(stream, "replica", None))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return dict(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total
    )


async def _collect(server: Server, lora, streams, request: Request) -> list[RequestOutput]:
    """Runs whole (not streamed) requests to the end; a client that disconnects aborts
    them."""

    async def drain(stream) -> RequestOutput:
        last = None
        async for out in _outputs(server, lora, stream):
            last = out
        return last

    tasks = [asyncio.ensure_future(drain(s)) for s in streams]
    gathered = asyncio.gather(*tasks)
    try:
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=0.5)
            if done:
                return gathered.result()
            if await request.is_disconnected():
                raise APIError(499, "the client disconnected")
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


def _finish(out) -> tuple[str | None, Any]:
    return out.finish_reason, out.stop_reason


def _check_finished(out: RequestOutput) -> None:
    if out.error:  # the engine ended it with an error (a bad adapter, a failed batch)
        raise APIError(400, out.error)


async def serve_completion(server: Server, body: CompletionRequest, request: Request):
    lora = await server.lora_for(body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if body.best_of not in (None, body.n):
        raise APIError(400, "best_of is not supported (it must equal n)", "best_of")
    try:
        params = body.sampling_params(body.max_tokens, body.logprobs)
    except (ValueError, TypeError) as e:
        raise _bad_request(e) from None
    prompts = _completion_prompts(body.prompt)
    model = body.model or server.base
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    streams = await _submit_all(server, prompts, params, lora, body.priority)
    tokenizer = server.tokenizer

    def choice_logprobs(c, offset: int):
        if body.logprobs is None or c.logprobs is None:
            return None
        return _completion_logprobs(tokenizer, c.token_ids, c.logprobs, offset)

    if not body.stream:
        outs = await _collect(server, lora, streams, request)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, out in enumerate(outs):
            _check_finished(out)
            prompt_tokens += len(out.prompt_token_ids)
            for c in out.outputs:
                reason, stop_reason = _finish(c)
                text = (out.prompt or "") + c.text if body.echo else c.text
                choices.append(
                    dict(
                        index=i * params.n + c.index,
                        text=text,
                        logprobs=choice_logprobs(c, 0),
                        finish_reason=reason,
                        stop_reason=stop_reason,
                    )
                )
                completion_tokens += len(c.token_ids)
        body_out = dict(
            id=rid,
            object="text_completion",
            created=created,
            model=model,
            choices=choices,
            usage=_usage(prompt_tokens, completion_tokens),
        )
        return JSONResponse(body_out, headers=_replica_headers(server, streams))

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        counts = {"prompt": 0, "completion": 0}
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream) -> None:
            try:
                async for out in _outputs(server, lora, stream):
                    await queue.put((i, out))
            except APIError as e:  # its replica was lost mid-stream
                await queue.put((i, e))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            live, first_of = len(tasks), set()
            offsets: dict[int, int] = {}
            while live:
                i, out = await queue.get()
                if out is None:
                    live -= 1
                    continue
                if isinstance(out, APIError):
                    yield _sse(error_body(out.status, out.message))
                    continue
                if out.error:
                    yield _sse(error_body(400, out.error))  # ended by the engine
                    continue
                if i not in first_of:
                    first_of.add(i)
                    counts["prompt"] += len(out.prompt_token_ids)
                for c in out.outputs:
                    index = i * params.n + c.index
                    text = c.text
                    if body.echo and index not in offsets:
                        text = (out.prompt or "") + text
                    if not text and not c.token_ids and c.finish_reason is None:
                        continue
                    counts["completion"] += len(c.token_ids)
                    lp = choice_logprobs(c, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(text)
                    reason, stop_reason = _finish(c)
                    chunk = dict(
                        id=rid,
                        object="text_completion",
                        created=created,
                        model=model,
                        choices=[
                            dict(
                                index=index,
                                text=text,
                                logprobs=lp,
                                finish_reason=reason,
                                stop_reason=stop_reason,
                            )
                        ],
                    )
                    if include_usage:
                        chunk["usage"] = None
                    yield _sse(chunk)
            if include_usage:
                yield _sse(
                    dict(
                        id=rid,
                        object="text_completion",
                        created=created,
                        model=model,
                        choices=[],
                        usage=_usage(counts["prompt"], counts["completion"]),
                    )
                )
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                s.close()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers=_replica_headers(server, streams)
    )


def _completion_prompts(prompt) -> list[Any]:
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


def _completion_logprobs(tokenizer, token_ids, logprobs, offset: int) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, entry in zip(token_ids, logprobs):
        piece = tokenizer.decode([tid], skip_special_tokens=False)
        tokens.append(piece)
        token_lps.append(entry[tid].logprob if tid in entry else None)
        tops.append(
            {
                tokenizer.decode([t], skip_special_tokens=False): lp.logprob
                for t, lp in entry.items()
            }
        )
        offsets.append(offset)
        offset += len(piece)
    return dict(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets)


def _chat_logprobs(tokenizer, token_ids, logprobs, top: int) -> dict[str, Any]:
    content = []
    for tid, entry in zip(token_ids, logprobs):
        piece = tokenizer.decode([tid], skip_special_tokens=False)
        ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:top]
        content.append(
            dict(
                token=piece,
                logprob=entry[tid].logprob if tid in entry else None,
                bytes=list(piece.encode()),
                top_logprobs=[
                    dict(
                        token=(p := tokenizer.decode([t], skip_special_tokens=False)),
                        logprob=lp.logprob,
                        bytes=list(p.encode()),
                    )
                    for t, lp in ranked
                ],
            )
        )
    return {"content": content}


def _render_chat(tokenizer, body, tokenize: bool):
    """``body.messages`` through the chat template (a 400 naming ``messages`` if it cannot
    render): the text, or its ids without added special tokens."""
    try:
        return tokenizer.apply_chat_template(
            body.messages,
            chat_template=body.chat_template,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            tools=body.tools,
            tokenize=tokenize,
            **(body.chat_template_kwargs or {}),
        )
    except Exception as e:  # a template error is the request's: jinja2, TypeError, ...
        raise APIError(
            400, f"messages: cannot render the chat template ({e})", "messages"
        ) from None


async def serve_tokenize(server: Server, body: TokenizeRequest):
    """vLLM's ``/tokenize``: the ids a prompt (or a chat) becomes, their count and the
    context length; the model must be one this server serves (404 otherwise)."""
    await server.lora_for(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of prompt and messages", "prompt")
    tokenizer = server.tokenizer
    if body.prompt is not None:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = tokenizer.encode(body.prompt, add_special_tokens=special)
    else:
        text = _render_chat(tokenizer, body, tokenize=False)
        tokens = tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
    strs = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return dict(
        count=len(tokens), max_model_len=server.max_model_len, tokens=tokens, token_strs=strs
    )


async def serve_detokenize(server: Server, body: DetokenizeRequest):
    """vLLM's ``/detokenize``: the text of ``tokens``, special tokens kept."""
    await server.lora_for(body.model)
    size = len(server.tokenizer)
    bad = [t for t in body.tokens if not 0 <= t < size]
    if bad:
        raise APIError(
            400, f"tokens: ids {bad[:8]} are outside the vocabulary (size {size})", "tokens"
        )
    return {"prompt": server.tokenizer.decode(body.tokens)}


async def serve_chat(server: Server, body: ChatCompletionRequest, request: Request):
    lora = await server.lora_for(body.model)
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = body.top_logprobs or 0
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    try:
        params = body.sampling_params(max_tokens, top if body.logprobs else None)
    except (ValueError, TypeError) as e:
        raise _bad_request(e) from None
    tokenizer = server.tokenizer
    ids = _render_chat(tokenizer, body, tokenize=True)
    model = body.model or server.base
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    stream = await _submit(server, {"prompt_token_ids": ids}, params, lora, body.priority)

    def logprobs_of(c):
        if not body.logprobs or c.logprobs is None:
            return None
        return _chat_logprobs(tokenizer, c.token_ids, c.logprobs, top)

    if not body.stream:
        (out,) = await _collect(server, lora, [stream], request)
        _check_finished(out)
        choices = []
        for c in out.outputs:
            reason, stop_reason = _finish(c)
            choices.append(
                dict(
                    index=c.index,
                    message=dict(role="assistant", content=c.text),
                    logprobs=logprobs_of(c),
                    finish_reason=reason,
                    stop_reason=stop_reason,
                )
            )
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        body_out = dict(
            id=rid,
            object="chat.completion",
            created=created,
            model=model,
            choices=choices,
            usage=_usage(len(ids), completion_tokens),
        )
        return JSONResponse(body_out, headers=_replica_headers(server, [stream]))

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        base = dict(id=rid, object="chat.completion.chunk", created=created, model=model)
        started: set[int] = set()
        completion_tokens = 0
        try:
            async for out in _outputs(server, lora, stream):
                if out.error:
                    yield _sse(error_body(400, out.error))  # ended by the engine
                    continue
                for c in out.outputs:
                    if c.index not in started:
                        started.add(c.index)
                        first = dict(
                            index=c.index,
                            delta=dict(role="assistant", content=""),
                            logprobs=None,
                            finish_reason=None,
                        )
                        yield _sse(dict(base, choices=[first]))
                    if not c.text and not c.token_ids and c.finish_reason is None:
                        continue
                    completion_tokens += len(c.token_ids)
                    reason, stop_reason = _finish(c)
                    delta = dict(content=c.text) if c.text or reason is None else {}
                    choice = dict(
                        index=c.index,
                        delta=delta,
                        logprobs=logprobs_of(c),
                        finish_reason=reason,
                        stop_reason=stop_reason,
                    )
                    yield _sse(dict(base, choices=[choice]))
            if include_usage:
                yield _sse(dict(base, choices=[], usage=_usage(len(ids), completion_tokens)))
            yield "data: [DONE]\n\n"
        except APIError as e:  # its replica was lost mid-stream
            yield _sse(error_body(e.status, e.message))
            yield "data: [DONE]\n\n"
        finally:
            stream.close()

    return StreamingResponse(
        events(), media_type="text/event-stream", headers=_replica_headers(server, [stream])
    )


def _replica_headers(server: Server, streams) -> dict[str, str] | None:
    """The header naming the replica(s) that served a response (none for one engine)."""
    names = sorted({s.replica for s in streams if getattr(s, "replica", None)})
    return {server.replica_header: ",".join(names)} if names else None


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# -- adapters at run time --


def find_adapter(name: str, roots: list[Path]) -> Path | None:
    """The adapter folder named ``name`` in one of ``roots`` (vLLM's filesystem resolver
    idea), resolved; None if none holds it, or if the name leads outside its root."""
    if not name or name in (".", ".."):
        return None
    for root in roots:
        root = Path(root).resolve()
        try:
            candidate = (root / name).resolve()
        except (OSError, RuntimeError, ValueError):
            continue
        if root in candidate.parents and (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def _inside_roots(server: Server, path: str) -> Path:
    """The adapter folder, resolved (symlinks and ``..``), if it lies inside a root."""
    if not server.roots:
        raise APIError(403, "runtime adapter loading needs --lora-root: no root is configured")
    try:
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        raise APIError(400, f"lora_path {path!r} does not exist", "lora_path") from None
    for root in server.roots:
        if resolved == root or root in resolved.parents:
            return resolved
    raise APIError(403, f"lora_path {path!r} is outside the --lora-root folders", "lora_path")


async def load_adapter(server: Server, body: LoadLoRAAdapterRequest):
    if not server.runtime_updates:
        raise APIError(
            403,
            "runtime LoRA loading is off: start the server with --allow-runtime-lora-updating "
            f"(or {RUNTIME_LORA_ENV}=true) and --lora-root",
        )
    name = body.lora_name
    if name in server.served_names:
        raise APIError(400, f"lora_name {name!r} is the base model's name", "lora_name")
    path = _inside_roots(server, body.lora_path)
    replica = await server.add_adapter(name, path, body.load_inplace, body.lora_int_id)
    headers = {server.replica_header: replica} if replica else None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.", headers=headers)


async def unload_adapter(server: Server, body: UnloadLoRAAdapterRequest):
    if not server.runtime_updates:
        raise APIError(403, "runtime LoRA updating is off: --allow-runtime-lora-updating")
    await server.remove_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


# -- the command --


def parse_lora_modules(values: list[str]) -> list[tuple[str, str]]:
    """``name=path`` or vLLM's JSON form ``{"name": ..., "path": ...}``."""
    modules = []
    for value in values:
        value = value.strip()
        if value.startswith("{"):
            try:
                spec = json.loads(value)
                modules.append((str(spec["name"]), str(spec["path"])))
            except (ValueError, KeyError, TypeError) as e:
                raise argparse.ArgumentTypeError(f"--lora-modules {value!r}: {e}") from None
            continue
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"--lora-modules {value!r}: expected name=path")
        modules.append((name, path))
    return modules


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The engine's flags (``EngineArgs.add_cli_args``), then the server's; a server flag
    that the engine also has (``--served-model-name``, several names as in vLLM) wins. The
    parser needs ``conflict_handler="resolve"``."""
    AsyncEngineArgs.add_cli_args(parser)
    parser.add_argument("model_tag", nargs="?", help="model folder (or hub id) to serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="or LORAPLEX_API_KEY")
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH")
    parser.add_argument("--allow-runtime-lora-updating", action="store_true")
    parser.add_argument(
        "--lora-root",
        action="append",
        default=[],
        metavar="DIR",
        help="folders adapters may be loaded from at run time (repeatable); a request "
        "naming an adapter nobody loaded is looked for here as a folder of that name",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds SIGTERM waits for in-flight requests",
    )
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="serve with N engine replicas on Ray Serve (pip install loraplex[ray]), "
        "adapter-affinity routed; a local Ray cluster unless --ray-address",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="an existing Ray cluster for --replicas (e.g. auto, or ray://host:10001)",
    )
    return parser


def build_server(args: argparse.Namespace) -> Server:
    args.model = args.model_tag or args.model
    if not args.model:
        raise SystemExit("loraplex serve: name the model to serve (loraplex serve MODEL)")
    modules = parse_lora_modules(args.lora_modules)
    if modules and not args.enable_lora:
        raise SystemExit("loraplex serve: --lora-modules needs --enable-lora")
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(args))
    server = Server(engine, args)
    for name, path in modules:
        lora = LoRARequest(name, server.new_id(), path)
        start = time.perf_counter()
        engine.engine.add_lora(lora)  # a bad one stops the start, naming it
        server.metrics.loaded(name, "startup", time.perf_counter() - start)
        server.loras[name] = lora
    return server


def run(args: argparse.Namespace) -> int:
    if args.replicas is not None or args.ray_address is not None:
        try:
            from loraplex.entrypoints.ray.cluster import run_cluster
        except ImportError as e:
            raise SystemExit(
                f"loraplex serve --replicas needs Ray Serve: pip install loraplex[ray] ({e})"
            ) from None
        args.replicas = 1 if args.replicas is None else args.replicas
        return run_cluster(args)
    server = build_server(args)
    app = build_app(server)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    # uvicorn drains in-flight requests on SIGTERM (up to --shutdown-timeout, then cancels
    # them: their requests are aborted), then re-raises the signal to the handler it found:
    # a no-op one here, so a SIGTERM'd server exits 0 after its own shutdown
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        server.shutdown()
    return 0
