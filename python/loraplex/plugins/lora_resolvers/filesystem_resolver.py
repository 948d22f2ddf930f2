"""vLLM's filesystem resolver: the adapter ``<dir>/<lora_name>/`` of a local directory
(``VLLM_LORA_RESOLVER_CACHE_DIR``), served when its ``adapter_config.json`` says
``peft_type: LORA`` and names the served model as ``base_model_name_or_path``.

Unlike vLLM's, the name is checked (no empty, ``.`` or ``..`` part, no NUL, no part over 255
bytes), and the config is read as untrusted input beneath the directory (no link out of
it, a regular file, size-capped, off the event loop); the directory is also the root the
engine reads that adapter beneath, at every read."""

from __future__ import annotations

import asyncio
import json
import logging
import os

from loraplex._core import LoRARequest
from loraplex.errors import InvalidAdapterError
from loraplex.lora.resolver import LoRAResolver, LoRAResolverRegistry
from loraplex.lora.sources import RefusedFile, open_regular

logger = logging.getLogger("loraplex.lora")
CACHE_DIR_ENV = "VLLM_LORA_RESOLVER_CACHE_DIR"
CONFIG_MAX_BYTES = 1 << 20
MAX_PART = 255


def valid_name(name: str) -> bool:
    """A relative path of ordinary parts (``a`` or ``team/a``): nothing that climbs out."""
    if not name or "\0" in name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") and len(part) <= MAX_PART for part in name.split("/"))


class FilesystemResolver(LoRAResolver):
    """Adapters by folder name in ``lora_cache_dir``. ``strict`` (vLLM's rule): only a
    config with ``peft_type`` LORA and the served model's name as its base; not strict
    (the server's ``--enable-lora-discovery`` over ``--lora-root``): any folder holding an
    ``adapter_config.json``, the engine's load then checking it whole."""

    def __init__(self, lora_cache_dir: str, strict: bool = True):
        self.lora_cache_dir = lora_cache_dir
        self.root = os.path.realpath(lora_cache_dir)  # the engine reads beneath it
        self.strict = strict

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        return await asyncio.to_thread(self.find, base_model_name, lora_name)

    def find(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """``resolve_lora``'s work, on the calling thread."""
        if not valid_name(lora_name):
            return None
        name = f"{lora_name}/adapter_config.json"
        try:
            with open_regular(self.root, name, CONFIG_MAX_BYTES) as f:
                data = f.read(CONFIG_MAX_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except RefusedFile as e:
            if e.at_open:  # it leads out of the directory: not an adapter of it
                return None
            # there, but not to be read: the client is told why
            raise InvalidAdapterError(
                f"adapter {lora_name!r} in {self.lora_cache_dir}: {name} {e}"
            ) from None
        path = os.path.join(self.root, lora_name)
        if self.strict:
            try:
                config = json.loads(data)
            except ValueError:
                return None
            if not isinstance(config, dict) or config.get("peft_type") != "LORA":
                return None
            if config.get("base_model_name_or_path") != base_model_name:
                logger.info(
                    "LoRA %r in %s is for %r, not %r: not resolved",
                    lora_name,
                    self.lora_cache_dir,
                    config.get("base_model_name_or_path"),
                    base_model_name,
                )
                return None
        return LoRARequest(lora_name, 1, path)


def register_filesystem_resolver() -> None:
    """Registers the resolver over ``VLLM_LORA_RESOLVER_CACHE_DIR`` when it is set."""
    lora_cache_dir = os.environ.get(CACHE_DIR_ENV)
    if not lora_cache_dir:
        return
    if not os.path.isdir(lora_cache_dir):
        raise ValueError(
            f"{CACHE_DIR_ENV}={lora_cache_dir!r} must be a directory for the filesystem "
            "LoRA resolver"
        )
    LoRAResolverRegistry.register_resolver(
        "Filesystem Resolver", FilesystemResolver(lora_cache_dir)
    )
