"""loraplex's OpenMP default: threads that sleep, not spin, when out of work (libgomp
reports it with ``OMP_DISPLAY_ENV=verbose``: ``GOMP_SPINCOUNT`` 0), unless the user set
``OMP_WAIT_POLICY`` first."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def spin_count(code: str, **env: str) -> int:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run = subprocess.run(
        [sys.executable, "-c", code + "; torch.ones(1 << 16).sum()"],
        env={**base, "OMP_DISPLAY_ENV": "verbose", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", run.stdout + run.stderr)
    assert found, run.stderr[-2000:]
    return int(found.group(1))


def test_importing_loraplex_first_makes_openmp_threads_sleep():
    assert spin_count("import loraplex, torch") == 0
    assert spin_count("import torch") > 0  # what torch alone does: the default spins


def test_a_wait_policy_the_user_set_is_kept():
    assert spin_count("import loraplex, torch", OMP_WAIT_POLICY="ACTIVE") > 0
