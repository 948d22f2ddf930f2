"""``EngineClient``: all the door asks of the engine(s) behind it (vLLM's interface of the
same name). The routes and serving modules hold one and never reach past it. Two
implementations: ``LocalEngineClient`` here, over an ``AsyncLLM`` in this process, and
``RayEngineClient`` (``entrypoints/ray/cluster.py``), over engine replicas on Ray Serve.

An *adapter* here is anything with ``lora_name``, ``lora_int_id`` and ``lora_path`` (a
``LoRARequest`` locally, the cluster registry's entry over Ray)."""

from __future__ import annotations

import abc
import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any, Protocol

from loraplex._core import AdapterInUseError, LoraplexError, LoRARequest, UnknownAdapterError
from loraplex.engine.async_llm import AsyncLLM, EngineDeadError
from loraplex.engine.core_proc import CoreClient
from loraplex.engine.llm_engine import ModelFrontend
from loraplex.entrypoints.openai.errors import APIError
from loraplex.errors import InvalidAdapterError
from loraplex.outputs import RequestOutput
from loraplex.sampling_params import SamplingParams

REPLICA_HEADER = "x-loraplex-replica"  # names the replica that served a response


class Adapter(Protocol):
    @property
    def lora_name(self) -> str: ...
    @property
    def lora_int_id(self) -> int: ...
    @property
    def lora_path(self) -> str: ...


class OutputStream(Protocol):
    """One request's outputs: ``async for``; ``close()`` before the end aborts it.
    ``replica`` names the replica serving it (None for one engine)."""

    replica: str | None

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...
    def close(self) -> None: ...


class EngineClient(abc.ABC):
    """The engine side of the door. ``frontend`` is what requests are checked and
    tokenized against; ``max_num_seqs`` bounds a request's ``n``. Errors are ``APIError``:
    the request's own fault 400, an unknown adapter 404, one in use 409, an engine that
    stopped 503."""

    frontend: ModelFrontend
    max_num_seqs: int
    _lock: asyncio.Lock | None = None

    def _adapter_lock(self) -> asyncio.Lock:
        """Serialises adapter loads and unloads (made on the serving loop, on first use)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @abc.abstractmethod
    async def generate(
        self,
        request_id: str,
        prompt: dict[str, Any],
        params: SamplingParams,
        adapter: Adapter | None,
        priority: int = 0,
        tenant: str | None = None,
    ) -> OutputStream:
        """Queues one checked request (``prompt``: its ``prompt_token_ids``, maybe its
        ``prompt`` text; ``tenant``: under fair share, whose share it counts against); its
        stream once queued (errors in it are raised here)."""

    @abc.abstractmethod
    async def resolve_adapter(self, name: str) -> Adapter | None:
        """The adapter loaded under ``name``, or None."""

    @abc.abstractmethod
    async def list_adapters(self) -> list[Adapter]:
        """Every adapter loaded by name."""

    @abc.abstractmethod
    async def load_adapter(
        self, name: str, path: str, inplace: bool, lora_int_id: int | None
    ) -> tuple[Adapter, str | None]:
        """Loads (``inplace``: reloads) ``name`` from ``path``, with ``lora_int_id`` if
        given; the adapter and the replica that loaded it (None for one engine). A refusal
        leaves nothing of it, and an in-place reload's old weights."""

    @abc.abstractmethod
    async def unload_adapter(self, name: str) -> None:
        """Frees ``name``'s weights and identity; 409 while requests use it, 404 if
        unknown."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raises ``EngineDeadError`` unless a request can be served now."""

    @abc.abstractmethod
    async def stats(self) -> dict[str | None, dict[str, Any]]:
        """Each engine's state (``engine_stats``), keyed by replica id (None: the one
        engine of this process)."""

    def shutdown(self) -> None:  # noqa: B027 - most clients start nothing to stop
        """Stops what this client started."""


def request_error(e: BaseException) -> APIError:
    """An engine's refusal of a request as the HTTP answer."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e))
    return APIError(400, str(e))


class LocalEngineClient(EngineClient):
    """The ``AsyncLLM`` of this process. Adapter names are the core registry's: a name
    resolves to what the core holds under it, and its rules refuse clashing ids and names."""

    pid = os.getpid()  # the engine's process

    def __init__(self, engine: AsyncLLM):
        self.engine = engine
        self.frontend = engine.frontend
        self.max_num_seqs = engine.max_num_seqs

    async def generate(self, request_id, prompt, params, adapter, priority=0, tenant=None):
        try:
            stream = await self.engine.add_request(
                request_id, prompt, params, lora_request=adapter, priority=priority, tenant=tenant
            )
        except (ValueError, TypeError, LoraplexError, EngineDeadError) as e:
            raise request_error(e) from None
        return stream

    async def resolve_adapter(self, name: str) -> LoRARequest | None:
        return self.engine.lora_by_name(name)

    async def list_adapters(self) -> list[LoRARequest]:
        return self.engine.registered_loras()

    async def _engine_stats(self) -> dict[str, Any]:
        return self.engine.get_stats()

    async def _new_id(self) -> int:
        taken = {lora.lora_int_id for lora in await self.list_adapters()}
        return next(i for i in range(1, len(taken) + 2) if i not in taken)

    async def load_adapter(self, name, path, inplace, lora_int_id):
        async with self._adapter_lock():
            old = await self.resolve_adapter(name)
            if old is not None and not inplace:
                raise APIError(
                    400, f"The lora adapter '{name}' has already been loaded.", "lora_name"
                )
            lora_id = lora_int_id or (old.lora_int_id if old is not None else await self._new_id())
            lora = LoRARequest(name, lora_id, str(path), load_inplace=old is not None)
            try:
                await self.engine.add_lora(lora)
            except (InvalidAdapterError, ValueError, LoraplexError) as e:
                if old is None and await self.resolve_adapter(name) is not None:
                    await self.engine.remove_lora(lora_id)  # no residue of a failed load
                param = "lora_int_id" if "id" in str(e) and lora_int_id else "lora_path"
                raise APIError(400, f"cannot load adapter '{name}': {e}", param) from None
        return LoRARequest(name, lora_id, str(path)), None

    async def unload_adapter(self, name: str) -> None:
        async with self._adapter_lock():
            lora = await self.resolve_adapter(name)
            if lora is None:
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
            try:
                await self.engine.remove_lora(lora.lora_int_id)
            except AdapterInUseError as e:
                raise APIError(409, f"adapter '{name}' is in use: {e}", "lora_name") from None
            except UnknownAdapterError:
                pass  # already gone

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def stats(self) -> dict[str | None, dict[str, Any]]:
        return {None: dict(await self._engine_stats(), pid=self.pid)}

    def shutdown(self) -> None:
        self.engine.shutdown()


class ProcessEngineClient(LocalEngineClient):
    """The engine in a child process of this server (``CoreClient``; vLLM's default,
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps it in this one). The same rules as
    ``LocalEngineClient``; the core registry's answers are awaited replies."""

    def __init__(self, core: CoreClient):
        super().__init__(core)
        self.pid = core.proc.pid

    async def resolve_adapter(self, name: str) -> LoRARequest | None:
        return await self._call("lora_by_name", name)

    async def list_adapters(self) -> list[LoRARequest]:
        return await self._call("registered_loras")

    async def _engine_stats(self) -> dict[str, Any]:
        return await self._call("get_stats")

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await self.engine.call(method, *args)
        except EngineDeadError as e:
            raise request_error(e) from None
