"""``/v1/models`` and the adapters by name: which adapter a request's ``model`` names,
discovery in ``--lora-root`` folders (only with ``--enable-lora-discovery``), and vLLM's
``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``. Identity (ids, clashes) is the
engine's: the client answers what its core registry (or the cluster's) decides."""

from __future__ import annotations

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

logger = logging.getLogger("loraplex.serve")
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
MAX_NAME = 255  # a longer name is no folder name on Linux


def warn_ignored(body: OpenAIBaseModel, route: str) -> None:
    """vLLM's warning for fields it does not know (they are ignored)."""
    ignored = body.ignored_fields()
    if ignored:
        logger.warning(
            "The following fields were present in the %s request but ignored: %s",
            route,
            ignored[:32],
        )


def find_adapter(name: str, roots: list[Path]) -> Path | None:
    """The adapter folder named ``name`` in one of ``roots`` (vLLM's filesystem resolver
    idea), resolved; None if none holds it, or if the name leads outside its root."""
    if not name or name in (".", "..") or len(name) > MAX_NAME or "\0" in name or "/" in name:
        return None
    for root in roots:
        root = Path(root).resolve()
        try:
            candidate = (root / name).resolve()
            if root in candidate.parents and (candidate / "adapter_config.json").is_file():
                return candidate
        except (OSError, RuntimeError, ValueError):
            continue
    return None


async def adapter_for(ctx: ServingContext, model: str | None) -> Adapter | None:
    """The adapter a request's ``model`` names (None: the base); 404 for any other."""
    if model is None or model in ctx.options.served_names:
        return None
    if len(model) > MAX_NAME or "\0" in model:
        raise APIError(404, f"The model `{model[:64]}...` does not exist.", "model")
    adapter = await ctx.client.resolve_adapter(model)
    if adapter is not None:
        return adapter
    if ctx.options.lora_discovery:
        path = await ctx.off_loop(find_adapter, model, ctx.options.lora_roots)
        if path is not None:
            try:
                return (await load_named(ctx, model, str(path), False, None, "discovered"))[0]
            except APIError as e:
                adapter = await ctx.client.resolve_adapter(model)  # loaded meanwhile?
                if adapter is None:
                    raise APIError(e.status, e.message, "model", e.headers) from None
                return adapter
    raise APIError(404, f"The model `{model}` does not exist.", "model")


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
    path = await ctx.off_loop(_inside_roots, ctx, body.lora_path)
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
