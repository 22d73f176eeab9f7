"""Helpers for tests that drive a second latticeflow process."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 90) -> None:
    """Poll ``condition`` every 0.1 s; fail the test if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"exited early ({proc.returncode}): {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out: {proc.communicate()}")
        time.sleep(0.1)
