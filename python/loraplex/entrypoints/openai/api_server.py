"""``loraplex serve``: the OpenAI-compatible app (FastAPI + uvicorn, as vLLM's): its routes,
middleware and error handlers, and the local server's start and shutdown. Each route hands
over to its serving module; the engine is reached only through an ``EngineClient``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import logging.config
import os
import signal
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import loraplex
from loraplex.engine import core_proc
from loraplex.engine.arg_utils import AsyncEngineArgs
from loraplex.engine.async_llm import AsyncLLM, EngineDeadError
from loraplex.entrypoints.openai import serving_models
from loraplex.entrypoints.openai.cli_args import (
    check_args,
    generation_defaults,
    log_requests,
    lora_sources,
    read_chat_template,
)
from loraplex.entrypoints.openai.engine_client import LocalEngineClient, ProcessEngineClient
from loraplex.entrypoints.openai.errors import APIError, error_response
from loraplex.entrypoints.openai.metrics import Metrics
from loraplex.entrypoints.openai.middleware import APIKeyAuth, BodyLimit, RequestIdHeader
from loraplex.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from loraplex.entrypoints.openai.server_logs import (
    QuietPaths,
    log_banner,
    log_stats_forever,
    setup_logging,
)
from loraplex.entrypoints.openai.serving_chat import create_chat_completion
from loraplex.entrypoints.openai.serving_completion import create_completion
from loraplex.entrypoints.openai.serving_engine import ServeOptions, ServingContext
from loraplex.entrypoints.openai.serving_tokenization import detokenize, tokenize
from loraplex.gc_utils import freeze_startup_heap
from loraplex.plugins import load_general_plugins

logger = logging.getLogger("loraplex.serve")
OPEN_ROUTES = {"/health", "/ping", "/metrics"}  # reachable without the API key
SERVED = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/replicas", "/tokenize"}
SERVED |= {"/detokenize", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/version"}
SERVED |= OPEN_ROUTES


def build_app(ctx: ServingContext, args: argparse.Namespace | None = None) -> FastAPI:
    docs = (
        {}
        if args is None or not args.disable_fastapi_docs
        else dict(docs_url=None, redoc_url=None, openapi_url=None)
    )
    root_path = (args.root_path if args is not None else None) or ""
    app = FastAPI(title="loraplex", version=loraplex.__version__, root_path=root_path, **docs)
    app.state.ctx = ctx
    keys = ctx.options.api_key

    if keys:
        app.add_middleware(APIKeyAuth, keys=keys, open_routes=OPEN_ROUTES)
    if args is not None and args.enable_request_id_headers:
        app.add_middleware(RequestIdHeader)

    if args is not None:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=args.allowed_origins,
            allow_credentials=args.allow_credentials,
            allow_methods=args.allowed_methods,
            allow_headers=args.allowed_headers,
        )

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError):
        problems = []
        for err in e.errors()[:16]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            msg = str(err.get("msg"))[:512]
            problems.append(f"{where}: {msg}" if where else msg)
        first = e.errors()[0].get("loc", ()) if e.errors() else ()
        param = ".".join(str(p) for p in first if p != "body") or None
        return error_response(400, "; ".join(problems), param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def on_any(request: Request, e: Exception):  # never a plain-text 500
        logger.exception("error serving %s", request.url.path)
        return error_response(500, f"internal error: {type(e).__name__}: {str(e)[:512]}")

    @app.get("/health")
    @app.get("/ping")  # vLLM's (SageMaker's) name for the same check, by GET or POST
    @app.post("/ping")
    async def health() -> Response:
        try:
            await ctx.client.check_health()
        except EngineDeadError as e:
            return error_response(503, str(e))
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": loraplex.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        await ctx.metrics.refresh(ctx.client)
        body, content_type = ctx.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/replicas")
    async def replicas():
        """What each engine holds (adapters by tier), its queues and KV blocks."""
        stats = await ctx.client.stats()
        data = [dict(s, replica_id=key or "local") for key, s in stats.items()]
        for s in data:
            s["adapters"] = [a for a in s["adapters"] if a["tiers"]]
        return {"object": "list", "data": data}

    @app.get("/v1/models")
    async def models():
        return await serving_models.list_models(ctx)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(ctx, request, CompletionRequest)
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(ctx, request, ChatCompletionRequest)
        return await create_chat_completion(ctx, body, request)

    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        body = await read_body(ctx, request, TokenizeRequest)
        return await tokenize(ctx, body)

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        body = await read_body(ctx, request, DetokenizeRequest)
        return await detokenize(ctx, body)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        body = await read_body(ctx, request, LoadLoRAAdapterRequest)
        return await serving_models.load_lora_adapter(ctx, body)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        body = await read_body(ctx, request, UnloadLoRAAdapterRequest)
        return await serving_models.unload_lora_adapter(ctx, body)

    return app


async def read_body(ctx: ServingContext, request: Request, model: type[BaseModel]):
    """The request's body as ``model``: read as it arrives, then parsed and validated on
    the input pool (a big body never holds up the event loop); a 400 naming the field."""
    raw = await request.body()
    try:
        return await ctx.off_loop(model.model_validate_json, raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None


def serve_options(args: argparse.Namespace, model_folder: Path) -> ServeOptions:
    keys = args.api_key or (
        [os.environ["LORAPLEX_API_KEY"]] if os.environ.get("LORAPLEX_API_KEY") else []
    )
    content_format = args.chat_template_content_format
    load_general_plugins()
    roots = [Path(r).resolve() for r in args.lora_root]
    runtime = serving_models.runtime_updates_allowed(args.allow_runtime_lora_updating)
    return ServeOptions(
        served_names=args.served_model_name or [args.model],
        model=str(args.model),
        chat_template=read_chat_template(args.chat_template),
        chat_template_content_format="openai" if content_format == "openai" else "string",
        trust_request_chat_template=args.trust_request_chat_template,
        default_chat_template_kwargs=args.default_chat_template_kwargs or {},
        response_role=args.response_role,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        enable_force_include_usage=args.enable_force_include_usage,
        generation_defaults=generation_defaults(args, model_folder),
        log_requests=log_requests(args),
        log_outputs=args.enable_log_outputs,
        max_log_len=args.max_log_len,
        max_body_bytes=args.max_request_body_bytes,
        lora_roots=roots,
        runtime_lora_updating=runtime,
        lora_discovery=args.enable_lora_discovery,
        lora_sources=lora_sources(args.lora_sources),
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        resolvers=serving_models.build_resolvers(runtime, args.enable_lora_discovery, roots),
        api_key=[k.encode() for k in keys] or None,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        exclude_tools_when_tool_choice_none=args.exclude_tools_when_tool_choice_none,
        tenants_from_user=args.scheduling_policy == "fair",
    )


def uvicorn_config(app, args: argparse.Namespace, ctx: ServingContext) -> uvicorn.Config:
    config = uvicorn.Config(
        BodyLimit(app, ctx.options.max_body_bytes),
        host=args.host,
        port=args.port,
        uds=args.uds,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_graceful_shutdown=args.shutdown_timeout + 3,  # streams are cut before it
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
        ssl_ciphers=args.ssl_ciphers or "TLSv1",
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
    )
    if args.disable_access_log_for_endpoints:
        paths = {p.strip() for p in args.disable_access_log_for_endpoints.split(",") if p.strip()}
        logging.getLogger("uvicorn.access").addFilter(QuietPaths(paths))
    return config


class _Server(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT also cuts the streams still running once
    ``--shutdown-timeout`` has passed (each ends with an error event and ``[DONE]``)."""

    def __init__(self, config: uvicorn.Config, ctx: ServingContext, timeout: float):
        super().__init__(config)
        self.ctx, self.timeout = ctx, timeout
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame):
        if not self.should_exit and self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.call_later, self.timeout, self.ctx.cut_all)
        super().handle_exit(sig, frame)


def build_local(args: argparse.Namespace) -> tuple[ServingContext, list[str]]:
    """The engine of this process, its startup adapters loaded (a bad one stops the
    start, naming it), and the serving context over it."""
    modules = parse_lora_modules(args.lora_modules)
    if modules and not args.enable_lora:
        raise SystemExit("loraplex serve: --lora-modules needs --enable-lora")
    load_general_plugins()  # resolvers first: their folders are roots the engine reads beneath
    engine_args = AsyncEngineArgs.from_cli_args(args)
    engine_args.lora_root = [*(engine_args.lora_root or []), *serving_models.resolver_roots()]
    if core_proc.enabled():  # vLLM's default: the engine in a process of its own
        client: LocalEngineClient = ProcessEngineClient(core_proc.CoreClient(engine_args))
    else:
        client = LocalEngineClient(AsyncLLM.from_engine_args(engine_args))
    options = serve_options(args, client.frontend.folder)
    ctx = ServingContext(client, options, Metrics(options.base, client.frontend.max_model_len))
    for name, path in modules:
        start = time.perf_counter()
        try:
            asyncio.run(client.load_adapter(name, path, False, None))
        except Exception as e:
            client.shutdown()
            message = e.message if isinstance(e, APIError) else str(e)
            raise SystemExit(f"loraplex serve: --lora-modules {name}={path}: {message}") from None
        ctx.metrics.loaded(name, "startup", time.perf_counter() - start)
    return ctx, [name for name, _ in modules]


def parse_lora_modules(values: list[str]) -> list[tuple[str, str]]:
    """``name=path``, or vLLM's JSON form ``{"name": ..., "path": ...}``."""
    modules = []
    for value in values:
        value = value.strip()
        if value.startswith("{"):
            try:
                spec = json.loads(value)
                modules.append((str(spec["name"]), str(spec["path"])))
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"loraplex serve: --lora-modules {value!r}: {e}") from None
            continue
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"loraplex serve: --lora-modules {value!r}: expected name=path")
        modules.append((name, path))
    return modules


def run_server(args: argparse.Namespace) -> int:
    setup_logging(args)
    check_args(args)
    ctx, adapters = build_local(args)
    app = build_app(ctx, args)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        task = None
        if not args.disable_log_stats:
            task = asyncio.create_task(log_stats_forever(ctx, args.stats_interval))
        address = args.uds or f"http://{args.host}:{args.port}"
        log_banner(ctx, address, adapters, [r.path for r in app.routes if r.path in SERVED])
        yield
        if task is not None:
            task.cancel()

    app.router.lifespan_context = lifespan
    server = _Server(uvicorn_config(app, args, ctx), ctx, args.shutdown_timeout)
    freeze_startup_heap("server")
    # uvicorn re-raises the signal to the handler it found once it has shut down: a no-op
    # one here, so a SIGTERM'd server exits 0 after its own shutdown
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        ctx.close()
        ctx.client.shutdown()
    return 0
