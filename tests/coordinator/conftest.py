"""Fixtures for the coordinator tests (the machinery is in tests/live.py)."""

import pytest
from live import Coordinator, pg_database  # noqa: F401 - pg_database is a fixture


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """A coordinator on the embedded defaults (SQLite, local artifacts, in-process worker)."""
    c = Coordinator(tmp_path_factory.mktemp("coord"), {})
    yield c
    c.stop()
