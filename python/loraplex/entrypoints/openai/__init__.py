"""The OpenAI-compatible server (``loraplex serve``)."""
