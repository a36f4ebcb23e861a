"""docker-compose.yml: the stack it declares, and (where a compose tool is installed) that
`docker compose config` accepts it. No Docker engine runs here; tests/coordinator/
test_production_stack.py runs the same services as native processes, and bench/load.py
--backend production --replicas 2 runs two API replicas on one database, Redis and store."""

import ipaddress
import os
import re
import shutil
import subprocess

import pytest
import yaml
from helpers import ROOT

COMPOSE = ROOT / "docker-compose.yml"
ENV = {"POSTGRES_PASSWORD": "x" * 12, "MINIO_ROOT_PASSWORD": "y" * 12, "ELMFOREST_SECRET_KEY": "z" * 48}


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


def interpolated(value, env: dict[str, str] | None = None):
    """`value` with compose's ${NAME:-default} and ${NAME:?message} filled from `env` (else the default)."""
    env = env or {}

    def fill(m: re.Match) -> str:
        name, op, rest = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        assert op == ":-", f"${{{name}}} has no default and is not set"
        return rest

    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", fill, value)
    if isinstance(value, list):
        return [interpolated(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolated(v, env) for k, v in value.items()}
    return value


def test_the_api_scales_out_behind_a_proxy_that_the_replicas_trust():
    c = yaml.safe_load(COMPOSE.read_text())
    s = c["services"]
    api, proxy = interpolated(s["api"], ENV), interpolated(s["proxy"], ENV)
    # N replicas (2 unless ELMFOREST_API_REPLICAS says otherwise), none publishing a port: the proxy is the way in
    assert int(api["deploy"]["replicas"]) >= 2 and "ports" not in api
    assert int(interpolated(s["api"], {**ENV, "ELMFOREST_API_REPLICAS": "5"})["deploy"]["replicas"]) == 5
    assert api["command"][api["command"].index("--workers") + 1].isdigit()
    assert proxy["image"].startswith("nginx:") and proxy["ports"] == ["8000:80"]
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy" and "healthcheck" in proxy
    # every replica shares the database, the broker, the bucket and the signing key (none is local)
    env = api["environment"]
    assert env["ELMFOREST_DATABASE_URL"].startswith("postgresql+psycopg://") and "@postgres:" in env["ELMFOREST_DATABASE_URL"]
    assert env["ELMFOREST_BROKER_URL"].startswith("redis://redis:")
    assert env["ELMFOREST_STORAGE_URL"].startswith("s3://") and env["ELMFOREST_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["ELMFOREST_SECRET_KEY"] == ENV["ELMFOREST_SECRET_KEY"]
    with pytest.raises(AssertionError, match="ELMFOREST_SECRET_KEY"):  # no replica makes a key of its own
        interpolated(s["api"]["environment"]["ELMFOREST_SECRET_KEY"])
    # the replicas trust X-Forwarded-For from the proxy's fixed address, and from nothing else
    address = proxy["networks"]["default"]["ipv4_address"]
    assert env["ELMFOREST_TRUSTED_PROXIES"] == address
    subnet = interpolated(c["networks"]["default"]["ipam"]["config"][0]["subnet"])
    assert ipaddress.ip_address(address) in ipaddress.ip_network(subnet)
    from coordinator.settings import Settings

    assert Settings(trusted_proxies=env["ELMFOREST_TRUSTED_PROXIES"]).trusted_proxies == address
    # the proxy's configuration: mounted, spreading over every replica, passing who the client is
    mount = next(v for v in proxy["volumes"] if v.endswith(":/etc/nginx/nginx.conf:ro"))
    conf = (ROOT / mount.split(":")[0]).read_text()
    assert re.search(r"upstream api \{[^}]*zone api[^}]*server api:8000 resolve;", conf)
    assert "resolver 127.0.0.11" in conf  # Docker's DNS: one address per replica
    assert re.search(r"proxy_pass http://api;", conf)
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in conf
    assert "proxy_set_header X-Forwarded-Proto $scheme;" in conf
    assert "proxy_request_buffering off;" in conf  # part uploads stream through
    size = re.search(r"client_max_body_size (\d+)m;", conf)
    assert size and int(size.group(1)) * 2**20 > Settings().part_size
    assert conf.count("{") == conf.count("}")


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
