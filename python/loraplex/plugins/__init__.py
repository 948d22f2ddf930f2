"""General plugins, as vLLM loads them: each entry point in the ``vllm.general_plugins`` or
``loraplex.general_plugins`` group is a function called once per process before the server
starts (a plugin package registers resolvers there, say). ``VLLM_PLUGINS``, a comma-separated
list of entry-point names, limits which are loaded; unset, all are. A plugin that cannot be
imported is logged and skipped (vLLM's way); one whose function raises stops the start,
naming it (a misconfigured resolver is the operator's to fix, not to serve without).

loraplex's own entry points: ``lora_filesystem_resolver`` (``VLLM_LORA_RESOLVER_CACHE_DIR``)
and ``lora_hf_hub_resolver`` (``VLLM_LORA_RESOLVER_HF_REPO_LIST``, and only when named in
``VLLM_PLUGINS``, since it downloads)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from importlib.metadata import entry_points

logger = logging.getLogger("loraplex.plugins")
GROUPS = ("loraplex.general_plugins", "vllm.general_plugins")
_loaded = False


def allowed_plugins() -> list[str] | None:
    """The names ``VLLM_PLUGINS`` allows (None: all)."""
    value = os.environ.get("VLLM_PLUGINS")
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


def general_plugins() -> dict[str, Callable[[], object]]:
    """The allowed general plugins' functions by entry-point name (importing each)."""
    allowed = allowed_plugins()
    found: dict[str, Callable[[], object]] = {}
    for group in GROUPS:
        for ep in entry_points(group=group):
            if ep.name in found or (allowed is not None and ep.name not in allowed):
                continue
            try:
                found[ep.name] = ep.load()
            except Exception:
                logger.exception("Failed to load plugin %r (%s)", ep.name, ep.value)
    return found


def load_general_plugins() -> None:
    """Calls each allowed general plugin once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name, fn in general_plugins().items():
        try:
            fn()
        except Exception as e:
            raise RuntimeError(f"plugin {name!r} failed: {type(e).__name__}: {e}") from e
        logger.info("Loaded plugin %r", name)
