"""Property-based requests generated from the app's own OpenAPI schema (schemathesis): no
request, well-formed or not, anonymous or as a maintainer, gets a 5xx, and every status is
one the schema declares."""

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from coordinator import migrate
from coordinator.app import create_app
from coordinator.db import session_scope
from coordinator.models import Role
from coordinator.services import users
from coordinator.settings import Settings

_settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="elmforest-schemathesis-")),
                     requests_per_minute=0)  # fuzzing the routes, not the rate limit (tests/coordinator/test_limits.py)
migrate.upgrade(_settings.db_url)
with session_scope(_settings.db_url) as _db:
    _u = users.create_user(_db, "maint", "password123", Role.maintainer)
    _, TOKEN = users.create_token(_db, _u, "fuzz")
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_settings))
CHECKS = [not_a_server_error, status_code_conformance]
FUZZ = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))


@schema.parametrize()
@FUZZ
def test_no_server_errors_anonymous(case):
    case.call_and_validate(checks=CHECKS)


@schema.parametrize()
@FUZZ
def test_no_server_errors_as_maintainer(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)
