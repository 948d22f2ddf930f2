"""vLLM's LoRA resolvers (issue 27): the registry, the filesystem resolver (vLLM's rule, and
its config read as untrusted input), general plugins found by entry point and filtered by
``VLLM_PLUGINS``, and a server that resolves unknown ``model`` names through the filesystem,
hub and a test's own plugin resolver, while ``--lora-sources`` decides what
``/v1/load_lora_adapter`` may load (an s3:// URL against moto on 127.0.0.1 allowed, a hub
id refused)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import textwrap
from pathlib import Path

import openai
import pytest

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.errors import InvalidAdapterError
from loraplex.lora.resolver import LoRAResolver, LoRAResolverRegistry, _LoRAResolverRegistry
from loraplex.plugins.lora_resolvers.filesystem_resolver import FilesystemResolver
from test_adapter_sources import hub_repo, s3, upload  # noqa: F401 (s3: a fixture)
from test_server import KEY, http, start_server
from tiny_adapters import build_adapter, edit_config
from tiny_models import build_model


class Dummy(LoRAResolver):
    async def resolve_lora(self, base_model_name, lora_name):
        if lora_name == "test_lora":
            return LoRARequest(lora_name, 1, f"/dummy/{base_model_name}/{lora_name}")
        return None


def test_the_registry_as_vllms():
    registry = _LoRAResolverRegistry()
    first, second = Dummy(), Dummy()
    registry.register_resolver("dummy", first)
    assert "dummy" in registry.get_supported_resolvers()
    assert registry.get_resolver("dummy") is first
    registry.register_resolver("dummy", second)  # replaced (with a warning), as vLLM
    assert registry.get_resolver("dummy") is second
    with pytest.raises(KeyError, match="not found"):
        registry.get_resolver("unknown")
    with pytest.raises(TypeError, match="must be a LoRAResolver"):
        registry.register_resolver("bad", object())
    found = asyncio.run(second.resolve_lora("base", "test_lora"))
    assert found.lora_path == "/dummy/base/test_lora"
    assert asyncio.run(second.resolve_lora("base", "other")) is None


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("resolver-base"), "llama")


@pytest.fixture(scope="module")
def folders(base, tmp_path_factory):
    """A resolver directory: ``good`` (for ``base``), ``other-base``, ``not-lora``, ``out``
    (a link to an adapter outside), ``fifo`` (its config a FIFO); and the outside adapter."""
    top = tmp_path_factory.mktemp("resolver")
    cache = top / "cache"
    good = build_adapter(base, cache / "good", r=8, alpha=16, seed=51)
    shutil.copytree(good, cache / "other-base")
    edit_config(cache / "other-base", base_model_name_or_path="someone/else")
    shutil.copytree(good, cache / "not-lora")
    edit_config(cache / "not-lora", peft_type="IA3")
    outside = build_adapter(base, top / "outside", r=8, alpha=16, seed=52)
    (cache / "out").symlink_to(outside)
    shutil.copytree(good, cache / "fifo")
    (cache / "fifo" / "adapter_config.json").unlink()
    os.mkfifo(cache / "fifo" / "adapter_config.json")
    return cache, outside


def test_the_filesystem_resolver_reads_its_folder_as_untrusted_input(base, folders):
    """vLLM's rule (peft_type LORA, the served model as base); names that climb out, and a
    folder linking out, resolve to nothing; a config that is a FIFO is refused at once,
    naming it (vLLM's resolver would block opening it)."""
    cache, _ = folders
    resolver = FilesystemResolver(str(cache))
    resolve = lambda name: asyncio.run(resolver.resolve_lora(str(base), name))  # noqa: E731
    found = resolve("good")
    assert found.lora_name == "good" and Path(found.lora_path) == (cache / "good").resolve()
    for name in (
        "other-base",
        "not-lora",
        "out",
        "missing",
        "..",
        "../outside",
        "/etc",
        "a\0b",
        "",
    ):
        assert resolve(name) is None, name
    with pytest.raises(
        InvalidAdapterError, match=r"adapter 'fifo'.*adapter_config.json is not a regular file"
    ):
        resolve("fifo")
    loose = FilesystemResolver(str(cache), strict=False)
    assert asyncio.run(loose.resolve_lora("any", "other-base")) is not None


PLUGIN = textwrap.dedent(
    """
    from loraplex import LoRARequest
    from loraplex.lora.resolver import LoRAResolver, LoRAResolverRegistry
    import os

    class Prefixed(LoRAResolver):
        async def resolve_lora(self, base_model_name, lora_name):
            if lora_name.startswith("custom-"):
                path = os.path.join(os.environ["TEST_CUSTOM_DIR"], lora_name[len("custom-"):])
                return LoRARequest(lora_name, 99, path)
            return None

    def register():
        LoRAResolverRegistry.register_resolver("Prefixed", Prefixed())

    def broken():
        raise ValueError("the broken plugin's own error")
    """
)


def plugin_dir(top: Path, entries: dict[str, str]) -> Path:
    """A folder for ``PYTHONPATH`` holding the module ``testplug`` and a dist-info whose
    ``vllm.general_plugins`` entry points are ``entries`` (name -> ``module:function``)."""
    top.mkdir(parents=True, exist_ok=True)
    (top / "testplug.py").write_text(PLUGIN)
    info = top / "testplug-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: testplug\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{lines}")
    return top


def test_general_plugins_by_entry_point_filtered_by_vllm_plugins(tmp_path, monkeypatch, caplog):
    import loraplex.plugins as plugins

    top = plugin_dir(
        tmp_path / "plugins",
        {"prefixed": "testplug:register", "broken": "testplug:broken", "gone": "nomodule:x"},
    )
    monkeypatch.syspath_prepend(str(top))
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    found = plugins.general_plugins()
    assert {"prefixed", "broken", "lora_filesystem_resolver", "lora_hf_hub_resolver"} <= set(found)
    assert "gone" not in found and "Failed to load plugin 'gone'" in caplog.text
    monkeypatch.setenv("VLLM_PLUGINS", "prefixed")
    assert set(plugins.general_plugins()) == {"prefixed"}

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(LoRAResolverRegistry, "resolvers", {})
    plugins.load_general_plugins()
    assert list(LoRAResolverRegistry.get_supported_resolvers()) == ["Prefixed"]
    plugins.load_general_plugins()  # once per process
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setenv("VLLM_PLUGINS", "prefixed,broken")
    with pytest.raises(RuntimeError, match="plugin 'broken' failed: ValueError: the broken"):
        plugins.load_general_plugins()


@pytest.fixture(scope="module")
def resolving(base, folders, s3, tmp_path_factory):  # noqa: F811
    """A server with the filesystem resolver (VLLM_LORA_RESOLVER_CACHE_DIR), the hub
    resolver over a hand-built offline hub cache, the test's plugin, and --lora-sources
    local,s3 (moto's credentials in its environment)."""
    cache, _ = folders
    top = tmp_path_factory.mktemp("resolving")
    hub_adapters = top / "hub-adapters"
    build_adapter(base, hub_adapters / "sub", r=8, alpha=16, seed=53)
    commit = "c" * 40
    hub_repo(top / "hub", "org/adapters", {commit: hub_adapters}, {"main": commit})
    custom = top / "custom"
    build_adapter(base, custom / "x", r=8, alpha=16, seed=54)
    plugins = plugin_dir(top / "plugins", {"prefixed": "testplug:register"})
    client, s3_env = s3
    upload(client, folders[1], "resolving/outside")
    env = dict(os.environ, **s3_env)
    env.update(
        PYTHONPATH=os.pathsep.join([str(plugins), env.get("PYTHONPATH", "")]),
        VLLM_PLUGINS="lora_filesystem_resolver,lora_hf_hub_resolver,prefixed",
        VLLM_LORA_RESOLVER_CACHE_DIR=str(cache),
        VLLM_LORA_RESOLVER_HF_REPO_LIST="org/adapters",
        HF_HUB_CACHE=str(top / "hub"),
        HF_HUB_OFFLINE="1",
        TEST_CUSTOM_DIR=str(custom),
    )
    args = [str(base), "--api-key", KEY, "--enable-lora", "--max-lora-rank", "8"]
    args += ["--max-model-len", "256", "--allow-runtime-lora-updating"]
    args += ["--lora-root", str(top), "--lora-sources", "local,s3"]
    args += ["--lora-cache-dir", str(top / "adapter-cache")]
    proc, url = start_server(args, top / "server.log", env=env)
    yield url, {"hub": hub_adapters / "sub", "custom": custom / "x"}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_a_server_resolves_unknown_models_through_its_resolvers(base, folders, resolving):
    url, where = resolving
    cache, outside = folders
    llm = LLM(model=str(base), enable_lora=True, max_lora_rank=8, max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def offline(path):
        out = llm.generate(
            ["the quick"], params, lora_request=LoRARequest("x", 1, str(path)), use_tqdm=False
        )
        llm.llm_engine.remove_lora(1)
        return out[0].outputs[0].text

    api = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)

    def served(model):
        out = api.completions.create(
            model=model,
            prompt="the quick",
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return out.choices[0].text

    assert served("good") == offline(cache / "good")  # the filesystem resolver
    assert served("org/adapters/sub") == offline(where["hub"])  # the hub resolver, offline
    assert served("custom-x") == offline(where["custom"])  # the test's plugin
    names = {m.id for m in api.models.list().data}
    assert {"good", "org/adapters/sub", "custom-x"} <= names
    for name in ("other-base", "not-lora", "out", "org/adapters/none", "custom-missing-no"):
        if name == "custom-missing-no":
            with pytest.raises(
                openai.BadRequestError, match="custom-missing-no.*not a readable folder"
            ):
                served(name)
            continue
        with pytest.raises(openai.NotFoundError):
            served(name)
    with pytest.raises(openai.BadRequestError, match="adapter_config.json is not a regular file"):
        served("fifo")

    load = lambda body: http(url + "/v1/load_lora_adapter", "POST", body)  # noqa: E731
    status, body = load({"lora_name": "from-s3", "lora_path": "s3://adapters/resolving/outside"})
    assert status == 200, body
    assert served("from-s3") == offline(outside)
    status, body = load({"lora_name": "from-hub", "lora_path": "org/adapters"})
    assert status == 403 and "hub source" in body and "--lora-sources" in body, body
    status, body = load({"lora_name": "outside", "lora_path": str(outside.parent / "nope")})
    assert status in (400, 403), body
    assert http(url + "/health", key=None)[0] == 200


def test_the_hub_resolver_takes_only_plain_folders_of_listed_repos():
    """A name's folder becomes a download pattern: globs, climbing parts and other repos
    resolve to nothing, before anything is fetched."""
    from loraplex.plugins.lora_resolvers.hf_hub_resolver import HfHubResolver

    hub = HfHubResolver(["org/adapters", " team/more "])
    assert hub.split("org/adapters") == ("org/adapters", ".")
    assert hub.split("org/adapters/") == ("org/adapters", ".")
    assert hub.split("org/adapters/sql/v2") == ("org/adapters", "sql/v2")
    assert hub.split("team/more/x") == ("team/more", "x")
    for name in (
        "org/adapters/*",
        "org/adapters/[ab]",
        "org/adapters/../x",
        "org/adapters//x",
        "org/other/x",
        "org/adaptersX/y",
        "org/adapters/a?b",
    ):
        assert hub.split(name) is None, name
