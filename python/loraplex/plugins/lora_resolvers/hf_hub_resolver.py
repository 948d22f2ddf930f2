"""vLLM's hub resolver: ``lora_name`` ``org/repo`` or ``org/repo/sub/folder`` names an
adapter in one of the hub repos listed in ``VLLM_LORA_RESOLVER_HF_REPO_LIST``; its files
(``adapter_*`` at that folder, nothing else) come through ``huggingface_hub``'s cache, so
``HF_HUB_OFFLINE`` is honoured and a cached repo resolves offline. Registered only when
``VLLM_PLUGINS`` names ``lora_hf_hub_resolver``: it downloads from the network on a
client's word. The downloaded folder is then read beneath its repo's cache folder, its
config checked as the filesystem resolver checks it."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path

from loraplex._core import LoRARequest
from loraplex.lora.resolver import LoRAResolver, LoRAResolverRegistry
from loraplex.plugins import allowed_plugins
from loraplex.plugins.lora_resolvers.filesystem_resolver import FilesystemResolver, valid_name

logger = logging.getLogger("loraplex.lora")
REPO_LIST_ENV = "VLLM_LORA_RESOLVER_HF_REPO_LIST"
PLUGIN_NAME = "lora_hf_hub_resolver"
_PLAIN = re.compile(r"[\w.\-/]+")


class HfHubResolver(LoRAResolver):
    def __init__(self, repo_list: list[str]):
        self.repo_list = [r.strip().strip("/") for r in repo_list if r.strip()]

    def split(self, lora_name: str) -> tuple[str, str] | None:
        """(repo, folder inside it: ``"."`` for its top) for a listed repo, else None."""
        for repo in self.repo_list:
            if lora_name.rstrip("/") == repo:
                return repo, "."
            if lora_name.startswith(repo + "/"):
                sub = lora_name[len(repo) + 1 :].rstrip("/")
                # plain names only: the folder becomes a download pattern (no `*`, `?`, `[`)
                plain = _PLAIN.fullmatch(sub) is not None
                return (repo, sub) if plain and valid_name(sub) else None
        return None

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        found = self.split(lora_name)
        if found is None:
            return None
        repo, sub = found
        snapshot = await asyncio.to_thread(self._download, repo, sub)
        if snapshot is None:
            return None
        # beneath the repo's cache folder: the snapshot's files are links into its blobs
        folder = Path(snapshot)
        rel = f"snapshots/{folder.name}" + ("" if sub == "." else f"/{sub}")
        request = await FilesystemResolver(str(folder.parent.parent)).resolve_lora(
            base_model_name, rel
        )
        return None if request is None else LoRARequest(lora_name, 1, request.lora_path)

    def _download(self, repo: str, sub: str) -> str | None:
        from huggingface_hub import snapshot_download

        pattern = "adapter_*" if sub == "." else f"{sub}/adapter_*"
        try:
            snapshot = snapshot_download(repo, allow_patterns=[pattern])
        except Exception as e:  # not on the hub, offline without it cached, ...
            logger.info(
                "LoRA %s/%s not resolved from the hub: %s: %s", repo, sub, type(e).__name__, e
            )
            return None
        return str(snapshot)


def register_hf_hub_resolver() -> None:
    """Registers the hub resolver when ``VLLM_LORA_RESOLVER_HF_REPO_LIST`` is set and
    ``VLLM_PLUGINS`` names it (vLLM's opt-in: it downloads)."""
    repo_list = os.environ.get(REPO_LIST_ENV)
    if not repo_list:
        return
    if PLUGIN_NAME not in (allowed_plugins() or []):
        logger.warning(
            "%s is set but %s is not named in VLLM_PLUGINS: the hub resolver stays off "
            "(it downloads from the network, so it must be enabled by name)",
            REPO_LIST_ENV,
            PLUGIN_NAME,
        )
        return
    LoRAResolverRegistry.register_resolver("Hf Hub Resolver", HfHubResolver(repo_list.split(",")))
