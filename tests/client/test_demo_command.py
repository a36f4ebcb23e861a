"""The demo starts and administers its coordinator with the `elmforest` command, as a user
does; it names no coordinator module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from contributor_client import demo
from contributor_client.http import ClientError


def test_the_command_next_to_the_interpreter(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    cmd = tmp_path / "bin" / "elmforest"
    cmd.write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    assert demo.elmforest_command() == str(cmd)


def test_else_on_path_else_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    (tmp_path / "path").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    with pytest.raises(ClientError, match=r"pip install -e \."):
        demo.elmforest_command()
    on_path = tmp_path / "path" / "elmforest"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    assert demo.elmforest_command() == str(on_path)


def test_the_demo_names_no_coordinator_module():
    src = Path(demo.__file__).read_text()
    assert "elmforest_cli" not in src and '"-m"' not in src
    assert "import coordinator" not in src and "from coordinator" not in src
