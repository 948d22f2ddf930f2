import pytest
from hypothesis import settings

# This machine is shared and noisy: no test may depend on timing.
settings.register_profile("loraplex", deadline=None, max_examples=200)
settings.load_profile("loraplex")


@pytest.fixture(params=["default", "torch"])
def kernels(request, monkeypatch):
    """The CPU paths for LoRA and decode attention: the default (the C++ ops where built) or
    the torch ones."""
    if request.param == "torch":
        monkeypatch.setenv("LORAPLEX_CPU_KERNELS", "torch")
    return request.param
