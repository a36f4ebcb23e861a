"""Overload and rate limits against live coordinators, over real HTTP: past its requests in
flight a process answers 503 with Retry-After at once (never a timeout), while /healthz and
upload parts in flight still go through; past its requests a minute a client gets 429 with
Retry-After, counted across the processes of a server (a file in the data directory on the
embedded default, Redis when the broker is Redis), and another client is not affected."""

import hashlib
import threading
import time
import uuid

import httpx
import pytest
from live import REDIS, Coordinator, redis_available


def slow_body(seconds: float):
    """A request body that holds its request (and its place) for `seconds` while it trickles in."""
    yield b'{"name": '
    time.sleep(seconds)
    yield b'"slowpoke"}'


def hold_a_place(c: Coordinator, seconds: float) -> threading.Thread:
    t = threading.Thread(target=lambda: httpx.post(c.url + "/api/v1/domains", content=slow_body(seconds),
                                                   headers={"content-type": "application/json"}, timeout=60))
    t.start()
    time.sleep(0.5)
    return t


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """One place for requests, and no wait for one."""
    c = Coordinator(tmp_path_factory.mktemp("busy"), {"ELMFOREST_MAX_CONCURRENT_REQUESTS": "1",
                                                      "ELMFOREST_OVERLOAD_WAIT_SECONDS": "0"})
    yield c
    c.stop()


def test_past_capacity_503_comes_at_once_and_health_still_answers(busy):
    c = busy
    hold = hold_a_place(c, 4)
    try:
        for _ in range(3):
            t = time.monotonic()
            r = httpx.get(c.url + "/api/v1/domains", timeout=30)
            assert r.status_code == 503 and time.monotonic() - t < 1.0
            assert int(r.headers["retry-after"]) >= 1 and r.headers["cache-control"] == "private, no-store"
            assert r.json()["error"]["code"] == "overloaded" and "try again" in r.json()["error"]["message"]
        assert httpx.get(c.url + "/healthz", timeout=5).status_code == 200  # answered outside the gate
    finally:
        hold.join()
    assert httpx.get(c.url + "/api/v1/domains", timeout=30).status_code == 200  # a place again


def test_by_default_a_request_past_capacity_waits_a_moment_for_a_place_before_its_503(tmp_path):
    """The default: a short queue. A burst the process works through within the wait (1 s) is
    answered; a process that stays at capacity longer answers 503 with Retry-After."""
    c = Coordinator(tmp_path / "queued", {"ELMFOREST_MAX_CONCURRENT_REQUESTS": "1"}, worker=False)
    try:
        hold = hold_a_place(c, 0.3)  # frees its place within the wait
        t = time.monotonic()
        assert httpx.get(c.url + "/api/v1/domains", timeout=30).status_code == 200
        assert time.monotonic() - t < 1.0
        hold.join()
        hold = hold_a_place(c, 4)  # does not
        t = time.monotonic()
        r = httpx.get(c.url + "/api/v1/domains", timeout=30)
        waited = time.monotonic() - t
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert 0.9 <= waited < 2.5, waited
        hold.join()
    finally:
        c.stop()


def test_an_upload_in_flight_is_not_refused_while_requests_are(busy):
    c = busy
    alice = c.user("alice")
    data = b'{"text": "held-out text"}\n' * 1000
    info = alice.post("/uploads", {"purpose": "sample", "filename": "s.jsonl", "size": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest()})
    part = info["parts"][0]
    hold = hold_a_place(c, 4)
    try:
        assert httpx.get(c.url + "/api/v1/domains", timeout=30).status_code == 503
        r = httpx.put(part["url"], content=data, timeout=30)  # the part goes in
        assert r.status_code == 200, r.text
    finally:
        hold.join()
    done = alice.complete(f"/uploads/{info['upload_id']}/complete")
    assert done["status"] == "complete" and done["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module", params=["file", "redis"])
def limited(request, tmp_path_factory):
    """Two API processes, five requests a minute per client; counts in a file or in Redis."""
    env = {"ELMFOREST_REQUESTS_PER_MINUTE": "5"}
    if request.param == "redis":
        if not redis_available():
            pytest.skip("Redis is not running on 127.0.0.1:6379")
        env |= {"ELMFOREST_BROKER_URL": f"{REDIS}/0", "ELMFOREST_QUEUE": f"elmforest-limits-{uuid.uuid4().hex[:8]}"}
    c = Coordinator(tmp_path_factory.mktemp(f"limited-{request.param}"), env, worker=False,
                    serve_args=("--workers", "2"))
    c.kind = request.param
    yield c
    c.stop()


def fresh_get(c: Coordinator, path: str, token: str | None = None) -> httpx.Response:
    """A request on a new connection: either API process may take it."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=c.url, timeout=30, headers=headers) as h:
        return h.get(path)


def until_a_fresh_minute() -> None:
    """Wait until at least 20 s are left of this minute's window, so a test's requests share it."""
    if time.time() % 60 > 40:
        time.sleep(61 - time.time() % 60)


def test_a_client_past_its_rate_gets_429_with_retry_after_across_processes(limited):
    c = limited
    alice, bob = c.user("alice"), c.user("bob")
    until_a_fresh_minute()
    codes = [fresh_get(c, "/api/v1/forests", alice.token).status_code for _ in range(12)]
    assert codes == [200] * 5 + [429] * 7, codes  # five in all, whichever process answered
    r = fresh_get(c, "/api/v1/me", alice.token)
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    assert r.json()["error"]["code"] == "too_many_requests" and "at most 5 a minute" in r.json()["error"]["message"]
    assert r.headers["cache-control"] == "private, no-store"
    # another client is counted on its own; health, static files and upload parts are not counted
    assert fresh_get(c, "/api/v1/me", bob.token).status_code == 200
    assert all(fresh_get(c, "/healthz").status_code == 200 for _ in range(8))
    assert all(fresh_get(c, "/static/style.css").status_code == 200 for _ in range(8))
    # an address without a token is a client too
    anon = [fresh_get(c, "/api/v1/forests").status_code for _ in range(7)]
    assert anon.count(429) >= 2, anon
    if c.kind == "redis":  # the counts are in Redis, under the deployment's queue name
        import redis

        keys = redis.Redis.from_url(f"{REDIS}/0").keys(f"{c.env['ELMFOREST_QUEUE']}:rate:*")
        assert len(keys) >= 2
    else:
        assert (c.data_dir / "ratelimit.db").exists()



# ----------------------------------------------------------------------------- behind a proxy


@pytest.fixture(scope="module", params=["no proxy trusted", "127.0.0.2 trusted"])
def proxied(request, tmp_path_factory):
    """Five requests a minute per client, with the default (no proxy trusted) or one trusted
    reverse proxy at 127.0.0.2 (loopback has every 127.x.y.z: each is another machine here)."""
    env = {"ELMFOREST_REQUESTS_PER_MINUTE": "5"}
    if request.param != "no proxy trusted":
        env["ELMFOREST_TRUSTED_PROXIES"] = "127.0.0.2"
    c = Coordinator(tmp_path_factory.mktemp("proxied"), env, worker=False)
    c.trusted = request.param != "no proxy trusted"
    yield c
    c.stop()


def get_from(c: Coordinator, local: str, forwarded_for: str | None = None) -> int:
    """A request from the address `local`, with that X-Forwarded-For; its status."""
    headers = {"x-forwarded-for": forwarded_for} if forwarded_for else {}
    with httpx.Client(base_url=c.url, timeout=30, transport=httpx.HTTPTransport(local_address=local)) as h:
        return h.get("/api/v1/forests", headers=headers).status_code


def test_a_forged_x_forwarded_for_from_an_untrusted_address_does_not_change_its_bucket(proxied):
    c = proxied
    until_a_fresh_minute()
    # 127.0.0.1 and 127.0.0.3 are not proxies (uvicorn alone trusted 127.0.0.1): whatever
    # X-Forwarded-For they send, each of their requests counts against their own address
    for local in ("127.0.0.1", "127.0.0.3"):
        codes = [get_from(c, local, f"203.0.113.{i}") for i in range(1, 8)]
        assert codes == [200] * 5 + [429] * 2, (local, codes)
    if not c.trusted:  # nor does a would-be proxy's
        assert [get_from(c, "127.0.0.2", f"198.51.100.{i}") for i in range(6)] == [200] * 5 + [429]
        return
    # the addresses they named were charged nothing: through the trusted proxy, 203.0.113.1
    # has its five requests, and each client the proxy names has a bucket of its own
    assert [get_from(c, "127.0.0.2", "203.0.113.1") for _ in range(6)] == [200] * 5 + [429]
    assert get_from(c, "127.0.0.2", "203.0.113.2") == 200
    # a client that forges a hop before the proxy's (the proxy appends the address it saw) is
    # counted as the address the proxy saw, not the one it made up
    assert get_from(c, "127.0.0.2", "198.51.100.7, 203.0.113.1") == 429
    assert get_from(c, "127.0.0.2", "203.0.113.1, 198.51.100.8") == 200
    # and the proxy's own requests (no header) are its own, apart from its clients'
    assert get_from(c, "127.0.0.2") == 200
