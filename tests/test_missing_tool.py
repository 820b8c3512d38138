"""missing_tool and require_module (tests/conftest.py): a missing tool skips saying why, and fails under CI=true."""
from __future__ import annotations

import json

import pytest
from conftest import missing_tool, require_module


def test_a_missing_tool_skips_with_the_reason_but_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"^frob is not installed \(CI=true: .ci/run installs it"):
        missing_tool("frob is not installed")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match=r"^frob is not installed$"):
        missing_tool("frob is not installed")


def test_require_module_imports_or_reports_the_missing_module(monkeypatch):
    assert require_module("json", "never said") is json
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"^frob \(the test extra\): cannot import no_such_module_frob "):
        require_module("no_such_module_frob", "frob (the test extra)")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"cannot import no_such_module_frob .*CI=true"):
        require_module("no_such_module_frob", "frob (the test extra)")
