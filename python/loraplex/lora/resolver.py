"""vLLM's ``LoRAResolver``: what the server asks, given a ``model`` no adapter is loaded
under, for a ``LoRARequest`` to load (a miss handler). Resolvers are registered by name in
``LoRAResolverRegistry``, usually by a general plugin (``loraplex.plugins``); loraplex ships
vLLM's two, the filesystem and the hub resolvers, and the server's ``--enable-lora-discovery``
adds one for its ``--lora-root`` folders. The server consults them in registration order
when runtime adapter loading is allowed (``--allow-runtime-lora-updating`` or
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) or discovery is on; the first request a resolver
returns is loaded under an id the server picks (the resolver's own id is not used, as in
vLLM), and whatever it names is then read as untrusted input, like any adapter.

A resolver runs on the server's event loop: one that touches files or the network must do
so off it (``asyncio.to_thread``), as the two shipped here do."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Set

from loraplex._core import LoRARequest

logger = logging.getLogger("loraplex.lora")


class LoRAResolver(ABC):
    """Finds an adapter by name: ``resolve_lora`` returns the ``LoRARequest`` to load for
    ``lora_name`` on ``base_model_name`` (the server's ``--model``), or None if it has none."""

    @abstractmethod
    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """The adapter named ``lora_name`` for ``base_model_name``, or None."""


class _LoRAResolverRegistry:
    """Resolvers by name, in the order they were registered (a name registered again
    replaces its resolver, with a warning, as vLLM's does)."""

    def __init__(self) -> None:
        self.resolvers: dict[str, LoRAResolver] = {}

    def get_supported_resolvers(self) -> Set[str]:
        return self.resolvers.keys()

    def register_resolver(self, resolver_name: str, resolver: LoRAResolver) -> None:
        if not isinstance(resolver, LoRAResolver):
            raise TypeError(
                f"resolver {resolver_name!r} must be a LoRAResolver, got {type(resolver).__name__}"
            )
        if resolver_name in self.resolvers:
            logger.warning("LoRA resolver %r is already registered: replaced", resolver_name)
        self.resolvers[resolver_name] = resolver

    def get_resolver(self, resolver_name: str) -> LoRAResolver:
        if resolver_name not in self.resolvers:
            raise KeyError(
                f"LoRA resolver {resolver_name!r} not found; registered: "
                f"{', '.join(self.resolvers) or 'none'}"
            )
        return self.resolvers[resolver_name]


LoRAResolverRegistry = _LoRAResolverRegistry()
