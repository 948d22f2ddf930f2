"""The garbage collector in the processes loraplex owns (the server, the engine core, a
Ray replica): what was built at start-up (torch, the model, the app) lives until exit, so it
is moved out of the collector's sight. Left in, every full collection walks it: about 110 ms
with the engine in the server's process on a 2-core machine, a pause that stops ``/health``
and every stream (vLLM freezes its start-up heap for the same reason). Never called from
``LLM`` or ``AsyncLLM``: a library must not freeze its caller's heap."""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger(__name__)


def freeze_startup_heap(where: str) -> None:
    """Collects what start-up left behind, then freezes the rest: later collections
    only look at objects made after this call."""
    gc.collect()
    gc.freeze()
    logger.debug("%s: %d start-up objects frozen", where, gc.get_freeze_count())
