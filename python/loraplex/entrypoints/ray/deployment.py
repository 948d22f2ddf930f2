"""A loraplex engine as a Ray Serve deployment: each replica runs one ``AsyncLLM``; a
request's adapter is its multiplexed model id, resolved through the cluster's registry
(``registry.py``) or, for a name nobody registered, found as a folder of that name in a
``--lora-root`` and registered; ``AdapterAffinityRouter`` sends it to a replica that holds it.

Ray Serve's per-replica model cache is sized by the host tier (``max_cpu_loras``), not the
device slots: a host-tier hit costs a copy, a miss a disk read.

    app = engine_deployment(engine_kwargs, num_replicas=2).bind()
    handle = serve.run(app)
    async for out in handle.options(stream=True, multiplexed_model_id="sql").generate.remote(
        prompt, SamplingParams(...), request_id
    ):
        ...
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from loraplex.entrypoints.ray.registry import RegistryError, cluster_registry
from loraplex.entrypoints.ray.router import AdapterAffinityRouter

REPORT_PERIOD_S = 0.5  # how often a replica tells the registry what it holds


def engine_deployment(
    engine_kwargs: dict[str, Any],
    num_replicas: int = 2,
    lora_roots: list[str] | None = None,
    max_ongoing_requests: int | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    graceful_shutdown_timeout_s: float = 20.0,
    threads: int | None = None,
):
    """The deployment (not yet bound) for ``EngineArgs(**engine_kwargs)`` replicas, each
    computing with ``threads`` torch threads (None: Ray's default for an actor that reserves
    no CPU, which is one)."""
    from loraplex.engine.arg_utils import AsyncEngineArgs

    args = AsyncEngineArgs(**engine_kwargs)
    args.verify()
    max_adapters = max(1, args.max_cpu_loras or args.max_loras)
    roots = [str(Path(r).resolve()) for r in lora_roots or []]

    @serve.deployment(
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests or args.max_num_seqs,
        ray_actor_options=ray_actor_options or {"num_cpus": 0},
        request_router_config=RequestRouterConfig(
            request_router_class=AdapterAffinityRouter,
            request_router_kwargs={"max_adapters": max_adapters},
        ),
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
    )
    class LoraplexReplica:
        async def __init__(self) -> None:
            import torch

            from loraplex.gc_utils import freeze_startup_heap
            from loraplex.v1.engine.async_llm import AsyncLLM

            if threads is not None:
                torch.set_num_threads(threads)
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs))
            freeze_startup_heap("replica")
            self.registry = cluster_registry()
            self.replica_id = serve.get_replica_context().replica_id.unique_id
            self.held: dict[str, tuple[int, int]] = {}  # name -> (id, version) added here
            self.locks: dict[str, asyncio.Lock] = {}  # one per adapter: its reads are serial
            self.registry_epoch = 0  # the registry's, as of the last drops made here
            self.reporter = asyncio.get_running_loop().create_task(self._report_forever())

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, name: str):
            """The adapter named ``name``, resolved in the cluster and added here (Ray Serve
            counts it as this replica's model, which routes its requests here)."""
            return await self._ensure(name, None)

        async def _ensure(self, name: str, entry: dict | None):
            """``name``'s adapter as ``entry`` (the registry's, resolved now if None) says,
            added to the engine, or reloaded in place if the registry has a new version."""
            from loraplex import LoRARequest

            wanted = None if entry is None else (entry["lora_int_id"], entry["version"])
            if wanted is not None and self.held.get(name) == wanted:
                return LoRARequest(name, entry["lora_int_id"], entry["path"])  # no wait
            async with self.locks.setdefault(name, asyncio.Lock()):  # others' reads go on
                if entry is None:
                    entry = await self.registry.resolve.remote(name)
                if entry is None:
                    entry = await self.registry.register.remote(name, discover(name, roots))
                lora = LoRARequest(name, entry["lora_int_id"], entry["path"])
                held = self.held.get(name)
                if held != (entry["lora_int_id"], entry["version"]):
                    if held is not None:
                        lora = LoRARequest(name, held[0], entry["path"], load_inplace=True)
                    try:
                        await self.engine.add_lora(lora)
                    except BaseException:
                        if held is None:  # no residue of a failed load in the engine
                            await self.engine.remove_lora(lora.lora_int_id)
                        raise
                    self.held[name] = (entry["lora_int_id"], entry["version"])
                return LoRARequest(name, entry["lora_int_id"], entry["path"])

        async def generate(
            self,
            prompt,
            sampling_params,
            request_id: str,
            priority: int = 0,
            entry: dict | None = None,
            tenant: str | None = None,
        ) -> AsyncIterator[tuple[str, Any]]:
            """Yields ``(replica_id, RequestOutput)`` as the engine makes them. The adapter is
            the request's multiplexed model id; ``entry``, the registry's entry for it if the
            caller has it (it saves a lookup and carries the version to serve)."""
            name = serve.get_multiplexed_model_id()
            lora = None
            if name:
                await self.adapter(name)
                lora = await self._ensure(name, entry)
            async for out in self.engine.generate(
                prompt,
                sampling_params,
                request_id,
                lora_request=lora,
                priority=priority,
                tenant=tenant,
            ):
                yield self.replica_id, out

        async def check_health(self) -> None:
            """Ray Serve's health check: a replica whose engine loop died is replaced."""
            await self.engine.check_health()

        async def register(self, name: str, path: str, lora_int_id: int | None = None) -> dict:
            """Registers an adapter in the cluster (refused if its id or path clashes)."""
            return await self.registry.register.remote(name, path, lora_int_id)

        async def load_adapter(
            self, name: str, path: str, inplace: bool = False, lora_int_id: int | None = None
        ) -> dict:
            """Registers ``name`` -> ``path`` in the cluster and loads it here (the replica
            its requests will be routed to), or, ``inplace``, replaces its weights (the next
            version; each replica reloads it on its next request). An adapter that fails to
            load is not registered; its old weights, if any, stay. Answers the entry and
            this replica's id, or why it was refused (``error``) and this replica's id."""
            from loraplex._core import LoraplexError
            from loraplex.errors import InvalidAdapterError

            try:
                entry = await self._load_adapter(name, path, inplace, lora_int_id)
            except (RegistryError, InvalidAdapterError, LoraplexError, ValueError) as e:
                cause = getattr(e, "cause", None) or e  # the registry's, not Ray's wrapper
                return dict(error=str(cause), replica_id=self.replica_id)
            return dict(entry, replica_id=self.replica_id)

        async def _load_adapter(self, name, path, inplace, lora_int_id) -> dict:
            old = await self.registry.resolve.remote(name)
            if old is not None and inplace:  # the new weights are read before they replace
                async with self.locks.setdefault(name, asyncio.Lock()):
                    entry = await reload_in_place(
                        self.engine, self.registry, self.held, old, path, lora_int_id
                    )
            else:
                entry = await self.registry.register.remote(name, path, lora_int_id)
                try:
                    await self._ensure(name, entry)
                except BaseException:
                    if old is None:  # nothing left of a failed first load
                        await self.registry.unregister.remote(name)
                    raise
            await self.adapter(name)  # counted as this replica's: its requests come here
            return entry

        async def _report_forever(self) -> None:
            while True:
                try:
                    await self._report()
                except Exception:  # noqa: BLE001 - the registry restarting must not stop it
                    pass
                await asyncio.sleep(REPORT_PERIOD_S)

        async def _report(self) -> None:
            """Tells the registry what this engine holds; drops adapters unregistered in
            the cluster (those still in use are dropped on a later report)."""
            import torch

            from loraplex._core import AdapterInUseError, UnknownAdapterError

            ids = {name: lora_id for name, (lora_id, _) in self.held.items()}
            state = self.engine.get_stats()
            state["adapters"] = [a for a in state["adapters"] if a["tiers"]]
            state.update(held=sorted(ids), registry_epoch=self.registry_epoch)
            state.update(pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id())
            state.update(torch_threads=torch.get_num_threads())
            registered, epoch = await self.registry.report.remote(self.replica_id, state)
            for name, (lora_id, _) in list(self.held.items()):
                if name in registered:
                    continue
                async with self.locks.setdefault(name, asyncio.Lock()):
                    try:
                        await self.engine.remove_lora(lora_id)
                    except AdapterInUseError:
                        continue  # still listed in ``held``: dropped on a later report
                    except UnknownAdapterError:
                        pass
                    self.held.pop(name, None)
            self.registry_epoch = epoch

        async def __del__(self) -> None:
            self.reporter.cancel()
            try:
                await self.registry.forget_replica.remote(self.replica_id)
            except Exception:  # noqa: BLE001 - the cluster may be going down too
                pass
            self.engine.shutdown()

    return LoraplexReplica


async def reload_in_place(
    engine: Any,
    registry: Any,
    held: dict[str, tuple[int, int]],
    old: dict[str, Any],
    path: str,
    lora_int_id: int | None,
) -> dict[str, Any]:
    """Replaces the weights of ``old`` (the registry's entry) with ``path``'s, in ``engine``
    (an ``AsyncLLM``) and in ``registry`` (the cluster's actor), and records the version in
    ``held`` (name -> (id, version) this engine has). The registry is asked first, so a
    refusal (an id clash) leaves the engine as it was; if registering fails after the engine
    took the new weights (the registry lost), the old weights are put back. Raises what
    refused or failed."""
    from loraplex import LoRARequest

    name = old["name"]
    await registry.check.remote(name, path, lora_int_id, True)
    before = held.get(name)
    lora = LoRARequest(name, old["lora_int_id"], path, load_inplace=True)
    await engine.add_lora(lora)
    try:
        entry = await registry.register.remote(name, path, lora_int_id, True)
    except BaseException:
        if before is None:  # this engine did not have it: nothing of it stays
            await engine.remove_lora(lora.lora_int_id)
        else:
            await engine.add_lora(LoRARequest(name, before[0], old["path"], load_inplace=True))
            held[name] = (before[0], old["version"])
        raise
    held[name] = (entry["lora_int_id"], entry["version"])
    return entry


def discover(name: str, roots: list[str]) -> str:
    """The folder named ``name`` inside a root (``RegistryError`` if there is none)."""
    from loraplex.errors import InvalidAdapterError
    from loraplex.plugins.lora_resolvers.filesystem_resolver import FilesystemResolver

    found = None
    for root in roots:
        try:
            found = FilesystemResolver(root, strict=False).find("", name)
        except InvalidAdapterError as e:
            raise RegistryError(str(e)) from None
        if found is not None:
            break
    if found is None:
        where = ", ".join(roots) or "no --lora-root"
        raise RegistryError(
            f"adapter {name!r} is not registered in the cluster and not found in {where}"
        )
    return found.lora_path
