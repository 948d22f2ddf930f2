"""The adapter-affinity router inside a real Ray Serve app (a local cluster, 2 replicas of a
deployment that reports which replica answered): after the first request of each adapter,
every request for it lands on the same replica."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install loraplex[ray])")


def test_each_adapter_sticks_to_one_replica():
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from loraplex.entrypoints.ray.router import AdapterAffinityRouter

    @serve.deployment(
        num_replicas=2,
        max_ongoing_requests=8,
        ray_actor_options={"num_cpus": 0},
        request_router_config=RequestRouterConfig(request_router_class=AdapterAffinityRouter),
    )
    class Which:
        @serve.multiplexed(max_num_models_per_replica=8)
        async def adapter(self, name: str) -> str:
            return name

        async def __call__(self) -> tuple[str, str]:
            name = await self.adapter(serve.get_multiplexed_model_id())
            return name, serve.get_replica_context().replica_id.unique_id

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="test-router")
    try:
        handle = serve.run(Which.bind(), name="which", route_prefix=None)
        adapters = [f"a{i}" for i in range(6)]
        served: dict[str, set[str]] = {a: set() for a in adapters}
        for _ in range(4):  # one at a time: no replica is ever busy
            for a in adapters:
                name, replica = handle.options(multiplexed_model_id=a).remote().result()
                assert name == a
                served[a].add(replica)
        assert all(len(replicas) == 1 for replicas in served.values()), served
        assert len(set().union(*served.values())) == 2  # both replicas serve some
    finally:
        serve.shutdown()
        ray.shutdown()
