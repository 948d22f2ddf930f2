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

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from loraplex.entrypoints.ray.registry import RegistryError, cluster_registry
from loraplex.entrypoints.ray.router import AdapterAffinityRouter


def engine_deployment(
    engine_kwargs: dict[str, Any],
    num_replicas: int = 2,
    lora_roots: list[str] | None = None,
    max_ongoing_requests: int | None = None,
    ray_actor_options: dict[str, Any] | None = None,
):
    """The deployment (not yet bound) for ``EngineArgs(**engine_kwargs)`` replicas."""
    from loraplex.engine.arg_utils import AsyncEngineArgs

    args = AsyncEngineArgs(**engine_kwargs)
    args.verify()
    max_adapters = max(1, args.max_cpu_loras or args.max_loras)
    roots = [str(Path(r).resolve()) for r in lora_roots or []]

    @serve.deployment(
        num_replicas=num_replicas,
        max_ongoing_requests=max_ongoing_requests or args.max_num_seqs,
        ray_actor_options=ray_actor_options or {"num_cpus": 0},
        request_router_config=RequestRouterConfig(request_router_class=AdapterAffinityRouter),
    )
    class LoraplexReplica:
        def __init__(self) -> None:
            from loraplex.v1.engine.async_llm import AsyncLLM

            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs))
            self.registry = cluster_registry()
            self.replica_id = serve.get_replica_context().replica_id.unique_id

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, name: str):
            """The adapter named ``name``, registered in the cluster and added here."""
            from loraplex import LoRARequest

            entry = await self.registry.resolve.remote(name)
            if entry is None:
                entry = await self.registry.register.remote(name, discover(name, roots))
            lora = LoRARequest(name, entry["lora_int_id"], entry["path"])
            await self.engine.add_lora(lora)
            return lora

        async def generate(
            self, prompt, sampling_params, request_id: str
        ) -> AsyncIterator[tuple[str, Any]]:
            """Yields ``(replica_id, RequestOutput)`` as the engine makes them."""
            name = serve.get_multiplexed_model_id()
            lora = await self.adapter(name) if name else None
            async for out in self.engine.generate(
                prompt, sampling_params, request_id, lora_request=lora
            ):
                yield self.replica_id, out

        async def register(self, name: str, path: str, lora_int_id: int | None = None) -> dict:
            """Registers an adapter in the cluster (refused if its id or path clashes)."""
            return await self.registry.register.remote(name, path, lora_int_id)

    return LoraplexReplica


def discover(name: str, roots: list[str]) -> str:
    """The folder named ``name`` inside a root (resolved: ``..`` and symlinks out refused)."""
    for root in roots:
        candidate = Path(root, name).resolve()
        inside = candidate == Path(root) or Path(root) in candidate.parents
        if inside and (candidate / "adapter_config.json").is_file():
            return str(candidate)
    where = ", ".join(roots) or "no --lora-root"
    raise RegistryError(
        f"adapter {name!r} is not registered in the cluster and not found in {where}"
    )
