"""``/v1/models`` and the adapters by name: which adapter a request's ``model`` names,
discovery in ``--lora-root`` folders (only with ``--enable-lora-discovery``), and vLLM's
``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``. Identity (ids, clashes) is the
engine's: the client answers what its core registry (or the cluster's) decides."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from fastapi.responses import PlainTextResponse

from loraplex.entrypoints.openai.engine_client import REPLICA_HEADER, Adapter
from loraplex.entrypoints.openai.errors import APIError
from loraplex.entrypoints.openai.protocol import (
    LoadLoRAAdapterRequest,
    OpenAIBaseModel,
    UnloadLoRAAdapterRequest,
)
from loraplex.entrypoints.openai.serving_engine import ServingContext
from loraplex.errors import InvalidAdapterError
from loraplex.lora.resolver import LoRAResolverRegistry
from loraplex.lora.sources import source_kind
from loraplex.plugins.lora_resolvers.filesystem_resolver import FilesystemResolver

logger = logging.getLogger("loraplex.serve")
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
MAX_NAME = 255  # a longer name is no folder name on Linux
RESOLVE_TIMEOUT = 120.0  # seconds one resolver may take to answer (a hub download, say)
_resolving: dict[str, asyncio.Lock] = {}  # names being resolved now (emptied as they end)


def warn_ignored(body: OpenAIBaseModel, route: str) -> None:
    """vLLM's warning for fields it does not know (they are ignored)."""
    ignored = body.ignored_fields()
    if ignored:
        logger.warning(
            "The following fields were present in the %s request but ignored: %s",
            route,
            ignored[:32],
        )


async def adapter_for(ctx: ServingContext, model: str | None) -> Adapter | None:
    """The adapter a request's ``model`` names (None: the base), loaded through the
    resolvers if none is loaded under that name; 404 for any other."""
    if model is None or model in ctx.options.served_names:
        return None
    if len(model) > MAX_NAME or "\0" in model:
        raise APIError(404, f"The model `{model[:64]}...` does not exist.", "model")
    adapter = await ctx.client.resolve_adapter(model)
    if adapter is not None:
        return adapter
    if ctx.options.resolvers:
        adapter = await _resolve(ctx, model)
        if adapter is not None:
            return adapter
    raise APIError(404, f"The model `{model}` does not exist.", "model")


async def _resolve(ctx: ServingContext, model: str) -> Adapter | None:
    """vLLM's miss path: the resolvers in order, the first request one returns loaded
    under ``model`` with an id the engine picks. One resolution per name at a time (the
    others wait and find it loaded); a resolver's error is logged and the next one asked,
    a resolver's refusal (``InvalidAdapterError``) is the request's 400, and an adapter
    found but not loadable is a 400 naming why."""
    lock = _resolving.setdefault(model, asyncio.Lock())
    try:
        async with lock:
            adapter = await ctx.client.resolve_adapter(model)  # loaded meanwhile?
            if adapter is not None:
                return adapter
            failures = []
            for name, resolver in ctx.options.resolvers:
                try:
                    request = await asyncio.wait_for(
                        resolver.resolve_lora(ctx.options.model, model), RESOLVE_TIMEOUT
                    )
                except InvalidAdapterError as e:
                    raise APIError(400, str(e), "model") from None
                except Exception as e:  # a plugin's bug or a dead store: the next one
                    logger.warning(
                        "LoRA resolver %r failed on %r: %s: %s", name, model, type(e).__name__, e
                    )
                    continue
                if request is None:
                    continue
                try:
                    return (
                        await load_named(ctx, model, request.lora_path, False, None, "resolver")
                    )[0]
                except APIError as e:
                    adapter = await ctx.client.resolve_adapter(model)  # loaded meanwhile?
                    if adapter is not None:
                        return adapter
                    failures.append((name, e))
            if len(failures) == 1:  # the load's own answer (its status, its replica header)
                e = failures[0][1]
                raise APIError(e.status, e.message, "model", e.headers)
            if failures:
                said = "; ".join(f"{n}: {e.message}" for n, e in failures)
                raise APIError(
                    400, f"LoRA adapter {model!r} was found but not loaded: {said}", "model"
                )
            return None
    finally:
        if not lock.locked():
            _resolving.pop(model, None)


def resolver_roots() -> list[str]:
    """The folders registered resolvers serve adapters from (their ``root``): the engine
    reads those adapters beneath them, at every read."""
    return [r.root for r in LoRAResolverRegistry.resolvers.values() if getattr(r, "root", None)]


def build_resolvers(runtime: bool, discovery: bool, roots: list[Path]) -> list:
    """(name, resolver) in the order the server asks them: the registered ones (plugins')
    when runtime loading is allowed, as vLLM; then, with ``--enable-lora-discovery``, one
    per ``--lora-root`` (any folder of that name holding an adapter config)."""
    registered = list(LoRAResolverRegistry.resolvers.items())
    if registered and not runtime:
        logger.warning(
            "LoRA resolvers %s are registered but runtime LoRA loading is off "
            "(--allow-runtime-lora-updating or %s=true): not consulted",
            ", ".join(repr(n) for n, _ in registered),
            RUNTIME_LORA_ENV,
        )
    resolvers = registered if runtime else []
    if discovery:
        resolvers += [(f"lora-root {r}", FilesystemResolver(str(r), strict=False)) for r in roots]
    return resolvers


async def load_named(ctx, name, path, inplace, lora_int_id, source) -> tuple[Adapter, str | None]:
    start = time.perf_counter()
    adapter, replica = await ctx.client.load_adapter(name, path, inplace, lora_int_id)
    ctx.metrics.loaded(name, source, time.perf_counter() - start)
    logger.info("Loaded adapter %r from %s (%s)", name, path, source)
    return adapter, replica


async def list_models(ctx: ServingContext) -> dict:
    root = str(ctx.options.model)
    max_len = ctx.frontend.max_model_len
    card = dict(object="model", created=ctx.created, owned_by="loraplex")
    data = [
        dict(id=name, root=root, parent=None, max_model_len=max_len, **card)
        for name in ctx.options.served_names
    ]
    for adapter in await ctx.client.list_adapters():
        data.append(
            dict(id=adapter.lora_name, root=adapter.lora_path, parent=ctx.options.base, **card)
        )
    return {"object": "list", "data": data}


def _inside_roots(ctx: ServingContext, path: str) -> Path:
    """The adapter folder, resolved (symlinks and ``..``), if it lies inside a root."""
    if not ctx.options.lora_roots:
        raise APIError(403, "runtime adapter loading needs --lora-root: no root is configured")
    if "\0" in path:
        raise APIError(400, "lora_path must not hold a NUL byte", "lora_path")
    try:
        resolved = Path(path).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise APIError(400, f"lora_path {path[:256]!r} does not exist", "lora_path") from None
    for root in ctx.options.lora_roots:
        if resolved == root or root in resolved.parents:
            return resolved
    raise APIError(403, f"lora_path {path[:256]!r} is outside the --lora-root folders", "lora_path")


def _allowed_path(ctx: ServingContext, path: str) -> str:
    """``lora_path`` if its kind of source is one ``--lora-sources`` allows (a local one
    resolved, and inside a root); 403 naming the kind otherwise."""
    if "\0" in path:
        raise APIError(400, "lora_path must not hold a NUL byte", "lora_path")
    kind = source_kind(path)
    if kind not in ctx.options.lora_sources:
        raise APIError(
            403,
            f"lora_path {path[:256]!r} is a {kind} source; this server loads adapters from: "
            f"{', '.join(sorted(ctx.options.lora_sources))} (--lora-sources)",
            "lora_path",
        )
    return str(_inside_roots(ctx, path)) if kind == "local" else path


def _check_runtime(ctx: ServingContext) -> None:
    if not ctx.options.runtime_lora_updating:
        raise APIError(
            403,
            "runtime LoRA loading is off: start the server with --allow-runtime-lora-updating "
            f"(or {RUNTIME_LORA_ENV}=true) and --lora-root",
        )


async def load_lora_adapter(ctx: ServingContext, body: LoadLoRAAdapterRequest):
    _check_runtime(ctx)
    name = body.lora_name
    if name in ctx.options.served_names:
        raise APIError(400, f"lora_name {name!r} is the base model's name", "lora_name")
    if "\0" in name:
        raise APIError(400, "lora_name must not hold a NUL byte", "lora_name")
    path = await ctx.off_loop(_allowed_path, ctx, body.lora_path)
    _, replica = await load_named(
        ctx, name, str(path), body.load_inplace, body.lora_int_id, "runtime"
    )
    headers = {REPLICA_HEADER: replica} if replica else None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.", headers=headers)


async def unload_lora_adapter(ctx: ServingContext, body: UnloadLoRAAdapterRequest):
    _check_runtime(ctx)
    await ctx.client.unload_adapter(body.lora_name)
    ctx.metrics.forget_adapter(body.lora_name)
    logger.info("Unloaded adapter %r", body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def runtime_updates_allowed(flag: bool) -> bool:
    return bool(flag or os.environ.get(RUNTIME_LORA_ENV, "").lower() in ("1", "true"))
