"""Python-side errors, in the same hierarchy as the core's (``LoraplexError``)."""

from loraplex._core import LoraplexError


class InvalidAdapterError(LoraplexError, ValueError):
    """A LoRA adapter that cannot be served as given: the message names the adapter and the
    cause (unreadable path, malformed config, rank, unsupported target, shapes, values...)."""
