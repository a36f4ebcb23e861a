"""The operator's account commands, run as the real `elmforest` command where the database
is: a mistake gets one line saying what was wrong and what to do, never a traceback."""

import os
import subprocess
import sys

from coordinator.security import TOKEN_PREFIX


def run(data_dir, *args):
    env = {**os.environ, "ELMFOREST_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "elmforest_cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_user_create_and_set_role_say_what_went_wrong(tmp_path):
    assert run(tmp_path, "db", "upgrade").returncode == 0
    r = run(tmp_path, "user", "create", "alice", "--password", "password123")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(TOKEN_PREFIX)  # the token, shown once

    r = run(tmp_path, "user", "set-role", "alice", "boss")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "unknown role 'boss'; a role is one of contributor, maintainer, admin" in r.stderr

    r = run(tmp_path, "user", "set-role", "bob", "maintainer")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no user 'bob' on this coordinator; create it with `elmforest user create bob`" in r.stderr

    r = run(tmp_path, "user", "create", "alice", "--password", "password123")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "alice" in r.stderr

    r = run(tmp_path, "user", "set-role", "alice", "maintainer")
    assert r.returncode == 0 and "alice is now maintainer" in r.stderr
