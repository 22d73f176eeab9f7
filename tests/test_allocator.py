"""The commands' allocator settings: applied on glibc, skipped on request or elsewhere."""

from __future__ import annotations

import os
import sys

import pytest

from latticeflow import allocator, cli


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_settings_apply_on_glibc(monkeypatch):
    monkeypatch.delenv(allocator.ENVIRONMENT_VARIABLE, raising=False)
    assert allocator.keep_freed_memory()


def test_environment_variable_keeps_the_system_defaults(monkeypatch):
    monkeypatch.setenv(allocator.ENVIRONMENT_VARIABLE, "system")
    assert not allocator.keep_freed_memory()


def test_commands_apply_the_settings(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True) or True)
    with pytest.raises(SystemExit):
        cli.main(["info", "--help"])
    assert calls == []  # --help exits while parsing, before any work
    assert cli.main(["info", "no-such-file.h5"]) == cli.EXIT_INPUT
    assert calls == [True]
