import os

import pytest
from hypothesis import HealthCheck, settings

# Ray (the replica tests) sends no usage reports: no network at test time
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# This machine is shared and noisy: no test may depend on timing (hypothesis's deadline, nor
# its check that generating examples is fast, which a busy machine can fail on its own).
settings.register_profile(
    "loraplex", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("loraplex")


@pytest.fixture(params=["default", "torch"])
def kernels(request, monkeypatch):
    """The CPU paths for LoRA and decode attention: the default (the C++ ops where built) or
    the torch ones."""
    if request.param == "torch":
        monkeypatch.setenv("LORAPLEX_CPU_KERNELS", "torch")
    return request.param
