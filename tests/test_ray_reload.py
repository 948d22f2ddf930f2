"""A replica's in-place reload (``deployment.reload_in_place``), on a real engine and the real
registry rules without a cluster: the registry's calls go through a shim with its actor's
``.remote`` shape. A refusal leaves the engine's weights as they were; a registry that fails
after the engine took the new weights gets the old ones put back; a success serves the new
ones under the next version."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install loraplex[ray])")

from loraplex import LLM, AsyncEngineArgs, AsyncLLM, LoRARequest, SamplingParams  # noqa: E402
from loraplex.entrypoints.ray.deployment import reload_in_place  # noqa: E402
from loraplex.entrypoints.ray.registry import AdapterRegistry, RegistryError  # noqa: E402
from tiny_adapters import build_adapter  # noqa: E402
from tiny_models import build_model  # noqa: E402

PROMPT = "def add(a, b):"
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
IDS = itertools.count()


class ActorShim:
    """``registry.<method>.remote(...)`` awaitable, as on the actor handle; ``fail_register``
    makes ``register`` raise as a lost actor would."""

    def __init__(self, registry: AdapterRegistry):
        self.registry = registry
        self.fail_register: BaseException | None = None

    def __getattr__(self, method: str) -> SimpleNamespace:
        async def remote(*args):
            if method == "register" and self.fail_register is not None:
                raise self.fail_register
            return getattr(self.registry, method)(*args)

        return SimpleNamespace(remote=remote)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = build_model(tmp_path_factory.mktemp("reload-base"), "llama")
    root = tmp_path_factory.mktemp("reload-adapters")
    old, new = (build_adapter(base, root / n, seed=s) for n, s in (("old", 71), ("new", 72)))
    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=8, max_model_len=128)
    want = {}
    for i, (label, path) in enumerate((("old", old), ("new", new))):
        out = llm.generate(PROMPT, GREEDY, lora_request=LoRARequest(label, i + 1, str(path)))
        want[label] = out[0].outputs[0].text
    assert want["old"] != want["new"]  # the two adapters are told apart
    return dict(base=base, old=str(old), new=str(new), want=want)


def run(assets, scenario):
    """``scenario(engine, shim, held)`` on a fresh engine holding adapter 'a' (id 5) at its
    old weights, registered with 'c1' holding id 777."""

    async def main():
        engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(
                model=str(assets["base"]), enable_lora=True, max_lora_rank=8, max_model_len=128
            )
        )
        try:
            registry = AdapterRegistry()
            registry.register("a", assets["old"], 5)
            registry.register("c1", assets["new"], 777)
            await engine.add_lora(LoRARequest("a", 5, assets["old"]))
            held = {"a": (5, 1)}
            return await scenario(engine, ActorShim(registry), held)
        finally:
            engine.shutdown()

    return asyncio.run(main())


async def served(engine, path: str) -> str:
    text = ""
    lora = LoRARequest("a", 5, path)
    async for out in engine.generate(PROMPT, GREEDY, f"r{next(IDS)}", lora_request=lora):
        text = out.outputs[0].text
    return text


async def assert_old_weights_kept(engine, shim, held, old, assets) -> None:
    """The engine serves the old weights, holds them as before, and the registry still
    names the old adapter."""
    assert await served(engine, assets["old"]) == assets["want"]["old"]
    assert held == {"a": (5, 1)} and shim.registry.resolve("a") == old


def test_a_refused_reload_leaves_the_old_weights(assets):
    async def scenario(engine, shim, held):
        old = shim.registry.resolve("a")
        with pytest.raises(RegistryError, match="777 is already 'c1'"):
            await reload_in_place(engine, shim, held, old, assets["new"], 777)
        await assert_old_weights_kept(engine, shim, held, old, assets)

    run(assets, scenario)


def test_a_registry_lost_after_the_engine_took_the_weights_gets_the_old_ones_back(assets):
    async def scenario(engine, shim, held):
        old = shim.registry.resolve("a")
        shim.fail_register = ConnectionError("the registry actor died")
        with pytest.raises(ConnectionError):
            await reload_in_place(engine, shim, held, old, assets["new"], None)
        await assert_old_weights_kept(engine, shim, held, old, assets)

    run(assets, scenario)


def test_an_engine_that_did_not_hold_it_keeps_nothing_of_a_failed_reload(assets):
    async def scenario(engine, shim, held):
        old = shim.registry.resolve("a")
        await engine.remove_lora(5)
        held.clear()
        shim.fail_register = ConnectionError("the registry actor died")
        with pytest.raises(ConnectionError):
            await reload_in_place(engine, shim, held, old, assets["new"], None)
        assert 5 not in await engine.list_loras() and held == {}

    run(assets, scenario)


def test_a_reload_serves_the_new_weights_as_the_next_version(assets):
    async def scenario(engine, shim, held):
        old = shim.registry.resolve("a")
        entry = await reload_in_place(engine, shim, held, old, assets["new"], 5)
        assert (entry["lora_int_id"], entry["version"], entry["path"]) == (5, 2, assets["new"])
        assert held == {"a": (5, 2)}
        assert await served(engine, assets["new"]) == assets["want"]["new"]

    run(assets, scenario)
