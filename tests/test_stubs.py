"""The hand-written stubs must match the built module."""

import subprocess
import sys


def test_stubtest_finds_no_drift():
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "loraplex._core"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
