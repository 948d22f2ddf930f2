"""loraplex engines as Ray Serve replicas (a local cluster, 2 replicas of a tiny model, 3
adapters): greedy outputs equal a single engine's; each adapter's requests stay on one
replica; an adapter nobody registered is found in the --lora-root; an id clash made through
a replica is refused."""

from __future__ import annotations

import uuid

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install loraplex[ray])")

from loraplex import LLM, LoRARequest, SamplingParams  # noqa: E402
from loraplex.entrypoints.ray.registry import RegistryError  # noqa: E402
from tiny_adapters import build_adapter  # noqa: E402
from tiny_models import build_model  # noqa: E402

PROMPTS = ["def add(a, b):", "the quick brown"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_replicas_serve_adapters_with_affinity_and_one_registry(tmp_path):
    from ray import serve

    from loraplex.entrypoints.ray.deployment import engine_deployment
    from loraplex.entrypoints.ray.registry import cluster_registry

    base = build_model(tmp_path / "base", "llama")
    root = tmp_path / "root"
    paths = {f"a{i}": build_adapter(base, root / f"a{i}", seed=30 + i) for i in range(3)}
    kwargs = dict(model=str(base), enable_lora=True, max_lora_rank=8, max_loras=2)
    kwargs.update(max_cpu_loras=4, max_model_len=128)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="test-engine")
    try:
        registry = cluster_registry()
        for name in ("a0", "a1"):  # a2 is left for discovery in the root
            ray.get(registry.register.remote(name, str(paths[name])))
        app = engine_deployment(kwargs, num_replicas=2, lora_roots=[str(root)])
        handle = serve.run(app.bind(), name="engines", route_prefix=None)

        def run(model: str, prompt: str) -> tuple[str, str]:
            stream = handle.options(stream=True, multiplexed_model_id=model).generate.remote(
                prompt, GREEDY, uuid.uuid4().hex
            )
            items = list(stream)  # (replica id, RequestOutput), to the finished one
            replica, last = items[-1]
            assert last.finished and {r for r, _ in items} == {replica}
            return replica, last.outputs[0].text

        placed: dict[str, set[str]] = {}
        got: dict[tuple[str, str], str] = {}
        for _ in range(2):
            for model in ("a0", "a1", "a2", ""):
                for prompt in PROMPTS:
                    replica, text = run(model, prompt)
                    placed.setdefault(model, set()).add(replica)
                    assert got.setdefault((model, prompt), text) == text
        for model in ("a0", "a1", "a2"):
            assert len(placed[model]) == 1, placed
        entries = {e["name"]: e for e in ray.get(registry.entries.remote())}
        assert entries["a2"]["path"] == str(paths["a2"].resolve())  # discovered, registered
        with pytest.raises(RegistryError, match="already 'a0'"):
            handle.register.remote("clash", str(paths["a1"]), entries["a0"]["lora_int_id"]).result()
    finally:
        serve.shutdown()
        ray.shutdown()

    llm = LLM(**kwargs)
    for (model, prompt), text in got.items():
        lora = LoRARequest(model, 1 + int(model[1:]), str(paths[model])) if model else None
        want = llm.generate([prompt], GREEDY, lora_request=lora, use_tqdm=False)
        assert text == want[0].outputs[0].text, (model, prompt)
