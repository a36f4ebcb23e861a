"""docker-compose.yml: the stack it declares, and (where a compose tool is installed) that
`docker compose config` accepts it. No Docker engine runs here; tests/coordinator/
test_production_stack.py runs the same services as native processes."""

import os
import shutil
import subprocess

import pytest
import yaml
from helpers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
ENV = {"POSTGRES_PASSWORD": "x" * 12, "MINIO_ROOT_PASSWORD": "y" * 12}


def test_compose_declares_the_production_stack():
    c = yaml.safe_load(COMPOSE.read_text())
    s = c["services"]
    assert {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker", "celery-flower", "superlink"} <= set(s)
    for name in ("postgres", "redis", "minio", "api", "worker"):
        assert "healthcheck" in s[name], name
    # the API and the workers wait for the one-shot migration and the bucket
    for name in ("api", "worker"):
        deps = s[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["minio-init"]["condition"] == "service_completed_successfully"
    assert s["migrate"]["command"] == ["elmforest", "db", "upgrade"]
    assert "--no-worker" in s["api"]["command"] and s["worker"]["command"][:2] == ["elmforest", "worker"]
    assert {"pgdata", "redisdata", "miniodata"} <= set(c["volumes"])
    # every setting the services read is documented in .env.example
    example = (ROOT / ".env.example").read_text()
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "ELMFOREST_SECRET_KEY", "ELMFOREST_S3_PUBLIC_ENDPOINT_URL"):
        assert key in example
    assert (ROOT / "deploy" / "Dockerfile").exists() and (ROOT / "deploy" / "Dockerfile.cuda").exists()


def _compose_cmd():
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_validates(tmp_path):
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    # as an operator starts it: a copy of .env.example as .env beside the compose file
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    r = subprocess.run([*cmd, "config", "-q"], cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **ENV})
    assert r.returncode == 0, r.stderr
