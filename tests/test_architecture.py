"""The packages' imports run one way: web -> coordinator -> btm, contributor_client -> btm,
and only the `elmforest` command (elmforest_cli.py) wires packages together. Every import
counts, a deferred one inside a function too: an arrow running back or a cycle between
modules fails here, naming it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("btm", "coordinator", "contributor_client", "web")
MAY_IMPORT = {"btm": set(), "contributor_client": {"btm"}, "coordinator": {"btm"}, "web": {"coordinator", "btm"}}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (a name imported from a package counts as its
    submodule when it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] not in PACKAGES:
                continue
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def reachable(g: dict[str, set[str]], v: str) -> set[str]:
    seen, todo = set(), [v]
    while todo:
        for w in g.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The groups of two or more modules that import each other, directly or through others:
    v and w are in one group when each reaches the other."""
    reach = {v: reachable(g, v) for v in g}
    groups = {frozenset([v, *(w for w in reach[v] if v in reach.get(w, ()))]) for v in g if v in reach[v]}
    return sorted(sorted(c) for c in groups if len(c) > 1)


def test_imports_run_one_way():
    g = graph()
    assert len(g) > 50  # the walk found the packages
    back = sorted(f"{a} -> {b}" for a, deps in g.items() for b in deps
                  if a.split(".")[0] != b.split(".")[0] and b.split(".")[0] not in MAY_IMPORT[a.split(".")[0]])
    assert back == [], "imports running against web -> coordinator -> btm, contributor_client -> btm"


def test_no_module_cycles():
    assert cycles(graph()) == []


def test_the_check_sees_an_arrow_running_back_and_a_cycle():
    g = {"btm.a": {"btm.b"}, "btm.b": {"btm.c"}, "btm.c": {"btm.a"}, "btm.d": {"btm.a"}, "btm.e": {"btm.e"}}
    assert cycles(g) == [["btm.a", "btm.b", "btm.c"]]  # through a third module; a self-import is no cycle
    known = modules()
    src = ROOT / "coordinator" / "app.py"
    assert "btm.errors" in imports("coordinator.app", src, known)
    assert not any(m.startswith("web") for m in imports("coordinator.app", src, known))


def test_every_command_shows_examples():
    """A newcomer's first stop is `--help`: every command of `elmforest` ends it with EXAMPLES."""
    import click
    import typer

    from elmforest_cli import app

    def leaves(c, path=()):
        if isinstance(c, click.Group):
            for name, sub in c.commands.items():
                yield from leaves(sub, (*path, name))
        else:
            yield " ".join(path), c.help or ""

    commands = dict(leaves(typer.main.get_command(app)))
    assert len(commands) > 50
    assert [name for name, text in commands.items() if "EXAMPLES" not in text] == []


def test_no_function_is_over_the_complexity_limit():
    """The limit `make lint` holds the code to (pyproject.toml: C901, at most 10)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "C901", "--output-format", "concise",
                        str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
