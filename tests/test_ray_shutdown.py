"""``loraplex serve --replicas 1``: once ``/health`` says ready a completion is served; on
SIGTERM, a stream still running when
``--shutdown-timeout`` is up ends with an error event and ``data: [DONE]``, and the process
(the Ray cluster it started with it) exits 0 soon after."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install loraplex[ray])")

from test_serve_door import sigterm_during_stream  # noqa: E402
from test_server import http, start_server  # noqa: E402
from tiny_models import build_model  # noqa: E402

TIMEOUT_S = 3
FEW_S = 25  # Ray's own teardown (Serve's controller, the local cluster) on a 2-core VM


def test_sigterm_cuts_a_replica_stream_with_an_error_event_and_done(tmp_path):
    base = build_model(tmp_path / "base", "llama", max_position_embeddings=32768)
    args = [str(base), "--replicas", "1", "--shutdown-timeout", str(TIMEOUT_S)]
    proc, url = start_server(args, tmp_path / "server.log")  # once /health says ready
    status, text = http(url + "/v1/completions", "POST", {"prompt": "hi", "max_tokens": 2})
    assert status == 200, text  # ready means a completion is served, at once
    text, start = sigterm_during_stream(proc, url)
    assert '"error"' in text and "shutting down" in text and "data: [DONE]" in text, text[-2000:]
    assert proc.wait(timeout=120) == 0
    assert time.monotonic() - start < TIMEOUT_S + FEW_S
