"""The typed client and a real coordinator agree on the API.

The routes the client calls are read from the client itself: `contributor_client.api.Routes`
is the one place it spells a path, and which public method of `Coordinator` uses which route
is read from api.py's code. Against the /openapi.json of a running coordinator this fails
when the client names a route (method and path template) the server does not have, when a
route of the table is used by no public method, or when any other module of the client (the
CLI, commands, the demo, the Flower client, the HTTP mechanics) spells a path of the API
itself instead of calling a method of the typed client.
"""

from __future__ import annotations

import ast
import re

import httpx
import pytest
from helpers import ROOT
from live import Coordinator

from contributor_client import api

CLIENT = ROOT / "contributor_client"
API_MODULE = CLIENT / "api.py"
PREFIX = "/api/v1"
METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}


@pytest.fixture(scope="module")
def openapi(tmp_path_factory) -> dict:
    c = Coordinator(tmp_path_factory.mktemp("openapi"), {}, worker=False)
    try:
        r = httpx.get(c.url + "/openapi.json", timeout=30)
        assert r.status_code == 200
        yield r.json()
    finally:
        c.stop()


def served(openapi: dict) -> set[tuple[str, str]]:
    """(method, path template) of every operation the coordinator documents."""
    return {(m.upper(), path) for path, ops in openapi["paths"].items() for m in ops if m in METHODS}


def called() -> set[tuple[str, str]]:
    """(method, path template) of every route the client calls, from its own table."""
    return {(r.method, PREFIX + r.path) for r in api.ROUTES.values()} | {("GET", api.HEALTH)}


def path_pattern(openapi: dict) -> re.Pattern:
    """A string that starts like one of the server's paths: /<first segment>[/...]."""
    firsts = {p.removeprefix(PREFIX).split("/")[1] for p in openapi["paths"]}
    alternatives = "|".join(sorted(map(re.escape, firsts)))
    return re.compile(rf"^/({alternatives})(/|\?|$)")


def literals(tree: ast.AST):
    """(line, text) of every string literal, the literal pieces of f-strings included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def methods_routes() -> dict[str, set[str]]:
    """For each public method of Coordinator, the routes (names in Routes, or HEALTH) it calls,
    itself or through the private methods it calls."""
    tree = ast.parse(API_MODULE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Coordinator")
    uses: dict[str, set[str]] = {}
    calls: dict[str, set[str]] = {}
    for f in cls.body:
        if not isinstance(f, ast.FunctionDef):
            continue
        uses[f.name] = {n.attr for n in ast.walk(f) if isinstance(n, ast.Attribute)
                        and isinstance(n.value, ast.Name) and n.value.id == "Routes"}
        uses[f.name] |= {"HEALTH" for n in ast.walk(f) if isinstance(n, ast.Name) and n.id == "HEALTH"}
        calls[f.name] = {n.attr for n in ast.walk(f) if isinstance(n, ast.Attribute)
                         and isinstance(n.value, ast.Name) and n.value.id == "self"}

    def reach(name: str, seen: set[str]) -> set[str]:
        out = set(uses.get(name, ()))
        for other in calls.get(name, ()):
            if other not in seen and other in uses:
                seen.add(other)
                out |= reach(other, seen)
        return out

    return {name: reach(name, {name}) for name in uses if not name.startswith("_")}


def test_every_route_the_client_calls_is_one_the_coordinator_has(openapi):
    assert len(api.ROUTES) == len(set(api.ROUTES.values())), "a route named twice in api.Routes"
    unknown = sorted(called() - served(openapi))
    assert unknown == [], f"the client calls routes the coordinator does not have: {unknown}"


def test_every_route_of_the_table_has_a_typed_method():
    by_method = methods_routes()
    assert {"request_branch", "submit", "download_forest", "whoami", "tune_router"} <= set(by_method)
    used = set().union(*by_method.values())
    orphans = sorted((set(api.ROUTES) | {"HEALTH"}) - used)
    assert orphans == [], f"routes in the client's table that no public method of Coordinator calls: {orphans}"
    unknown = sorted(used - set(api.ROUTES) - {"HEALTH"})
    assert unknown == [], f"methods of Coordinator name routes that are not in api.Routes: {unknown}"


def test_the_client_spells_the_api_s_paths_only_in_its_route_table(openapi):
    """So every route the CLI, the demo and the Flower client use is called through a method of
    the typed client; and inside api.py, only the table (and HEALTH) spells one."""
    looks_like_a_route = path_pattern(openapi)
    found = []
    for f in sorted(CLIENT.rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        if f == API_MODULE:
            table = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Routes")
            health = next(n for n in tree.body if isinstance(n, ast.Assign)
                          and any(isinstance(t, ast.Name) and t.id == "HEALTH" for t in n.targets))
            allowed = {id(n) for part in (table, health) for n in ast.walk(part)}
            tree = ast.Module(body=[n for n in tree.body if id(n) not in allowed], type_ignores=[])
        found += [f"{f.relative_to(ROOT)}:{line}: {text!r}" for line, text in literals(tree)
                  if looks_like_a_route.match(text)]
    assert found == [], "paths of the coordinator's API spelled outside api.Routes:\n" + "\n".join(found)


def test_the_check_sees_a_spelled_path(openapi, tmp_path):
    """The scan above is not blind: the raw calls the client made before the typed API match."""
    pattern = path_pattern(openapi)
    code = 'c.post(f"/forests/{forest}/averages", {})\nc.get("/contributions", mine=True)\nhttpx.get(url + "/healthz")\n'
    hits = [text for _, text in literals(ast.parse(code)) if pattern.match(text)]
    assert sorted(hits) == ["/contributions", "/forests/", "/healthz"]
    assert not pattern.match("/api/v1") and not pattern.match("/dev/full") and not pattern.match("/")
