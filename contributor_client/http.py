"""The HTTP mechanics of talking to a coordinator, in one place: authentication, answers
turned into errors that say what to do, retries while the coordinator is busy (429/503,
as its Retry-After asks) or a kept-alive connection closed under a safe request, waiting
for jobs, uploads streamed part by part with progress, and downloads streamed to disk and
checked against their sha256.

`Client` knows no route of the API: the typed API, `contributor_client.api.Coordinator`,
names them and builds on it. Errors come back as ClientError carrying the server's message,
which already says what was wrong and what to do; a coordinator that cannot be reached says
so with its URL.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from btm import atomic
from btm.hashing import sha256_file  # noqa: F401 - part of this module's API

CHUNK = 1 << 20
T = TypeVar("T")


class ClientError(Exception):
    def __init__(self, message: str, status: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.status = status
        self.body = body or {}


IDEMPOTENT = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}


class Client:
    """Requests to the coordinator's API (paths under /api/v1, JSON in and out) and transfers
    to and from its store (the presigned URLs its answers carry, sent without the token)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, transport=None):
        self.url = url.rstrip("/")
        self.token = token
        headers = {"user-agent": "elmforest-client"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=self.url + "/api/v1", headers=headers, timeout=timeout,
                                 transport=transport, follow_redirects=True)
        # part PUTs and downloads go to storage URLs, with no API token attached
        self.raw = httpx.Client(timeout=httpx.Timeout(timeout, read=600.0, write=600.0), transport=transport,
                                follow_redirects=True)

    # ------------------------------------------------------------------ plumbing

    # a busy coordinator answers 429/503 with Retry-After: wait as asked, this many times at most
    BUSY_RETRIES = 6
    BUSY_WAIT_CAP = 60.0

    def request(self, method: str, path: str, **kw) -> Any:
        """One API call: sent again while the coordinator says it is busy (429/503, as long as
        its Retry-After asks, BUSY_RETRIES times at most) or closed a kept-alive connection
        under a request that is safe to repeat; its JSON answer, or a ClientError saying what
        to do."""
        for attempt in range(self.BUSY_RETRIES + 1):
            r = self._send(method, path, attempt, **kw)
            if r is None:  # the connection closed under a safe request: send it again
                continue
            if r.status_code not in (429, 503) or attempt == self.BUSY_RETRIES:
                break
            time.sleep(self._retry_after(r, attempt))
        return self._answer(r)

    def _send(self, method: str, path: str, attempt: int, **kw) -> httpx.Response | None:
        try:
            return self.http.request(method, path, **kw)
        except httpx.ConnectError:
            raise ClientError(f"cannot reach the coordinator at {self.url}: is it running, and is the URL right? "
                              "(set it with `elmforest login --url URL` or ELMFOREST_URL)") from None
        except httpx.TimeoutException:
            raise ClientError(f"the coordinator at {self.url} did not answer in time; try again") from None
        except httpx.TransportError as e:
            # RemoteProtocolError: a kept-alive connection the server closed just as this
            # request went out. No answer came, so a request that changes nothing (or the
            # same thing twice) is sent again on a new connection, as browsers do.
            if (isinstance(e, httpx.RemoteProtocolError) and method.upper() in IDEMPOTENT
                    and attempt < self.BUSY_RETRIES):
                return None
            raise ClientError(f"the connection to the coordinator at {self.url} broke ({type(e).__name__}); "
                              "run the command again (uploads resume where they stopped)") from None

    def _answer(self, r: httpx.Response) -> Any:
        if r.status_code in (429, 503):
            raise ClientError(f"the coordinator is busy or limiting requests (HTTP {r.status_code}: "
                              f"{self._message(r)}); gave up after {self.BUSY_RETRIES} retries: try again later",
                              r.status_code)
        if r.status_code >= 400:
            try:
                body = r.json()
                msg = body.get("error", {}).get("message") or body.get("detail") or r.text
            except ValueError:
                body, msg = {}, r.text[:500]
            if r.status_code == 401 and not self.token:
                msg = "not logged in: run `elmforest login` first (or set ELMFOREST_TOKEN)"
            raise ClientError(str(msg), r.status_code, body)
        if r.status_code == 204 or not r.content:
            return None
        return r.json()

    def _retry_after(self, r: httpx.Response, attempt: int) -> float:
        try:
            wait = float(r.headers.get("retry-after", ""))
        except ValueError:
            wait = 2.0**attempt
        return min(max(wait, 0.5) * (1 + 0.25 * attempt), self.BUSY_WAIT_CAP)

    @staticmethod
    def _message(r: httpx.Response) -> str:
        try:
            return r.json().get("error", {}).get("message") or r.text[:200]
        except ValueError:
            return r.text[:200]

    def complete(self, path: str, attempts: int = 4) -> Any:
        """Finish an upload: the server assembles the parts and hashes the whole file, which
        takes a while for large files, so this call waits longer than others. Completing is
        idempotent on the server, so a broken connection is retried before giving up."""
        for attempt in range(attempts):
            try:
                return self.request("POST", path, json={}, timeout=httpx.Timeout(60.0, read=3600.0))
            except ClientError as e:
                if e.status is not None or attempt == attempts - 1:
                    if e.status is None:
                        raise ClientError("the coordinator stopped while finishing the upload; run the same command "
                                          "again: it picks up where it stopped") from None
                    raise
                time.sleep(2.0 * (attempt + 1))

    def get(self, path: str, **params) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict | None = None, **params) -> Any:
        return self.request("POST", path, json=body or {}, params={k: v for k, v in params.items() if v is not None})

    # ------------------------------------------------------------------ waiting

    def wait(self, fetch: Callable[[], T], done: Callable[[T], bool], timeout: float = 3600,
             interval: float = 0.5, on_poll: Callable[[T], None] | None = None) -> T:
        """Call `fetch` until `done` says its answer is final (polling less and less often)."""
        end = time.monotonic() + timeout
        while True:
            x = fetch()
            if on_poll:
                on_poll(x)
            if done(x):
                return x
            if time.monotonic() > end:
                raise ClientError(f"still not done after {timeout:.0f}s: {json.dumps(x, default=_json)[:300]}")
            time.sleep(interval)
            interval = min(interval * 1.5, 5.0)

    # ------------------------------------------------------------------ uploads and downloads

    def put_parts(self, path: Path, info: dict, progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """PUT every part not yet done, streaming from the file (never the whole file in memory)."""
        done = set(info.get("parts_done", []))
        total = info["size"]
        if Path(path).stat().st_size != total:
            raise ClientError(f"{path} has changed since the upload began ({Path(path).stat().st_size} bytes, not "
                              f"{total}); start it again")
        sent = sum(p["length"] for p in info["parts"] if p["part_number"] in done)
        if progress:
            progress(sent, total)
        out = []
        with open(path, "rb") as f:
            for p in info["parts"]:
                if p["part_number"] in done:
                    continue
                r = self._put_part(f, (p["part_number"] - 1) * info["part_size"], p)
                out.append({"part_number": p["part_number"], "etag": r.headers.get("etag")})
                sent += p["length"]
                if progress:
                    progress(sent, total)
        return out

    def _put_part(self, f, offset: int, part: dict, attempts: int = 4) -> httpx.Response:
        """PUT one part's bytes of the open file `f` to its URL, again after a broken connection."""
        n, length = part["part_number"], part["length"]

        def body():
            f.seek(offset)
            left = length
            while left:
                b = f.read(min(CHUNK, left))
                if not b:
                    break
                left -= len(b)
                yield b

        for attempt in range(attempts):
            try:
                r = self.raw.put(part["url"], content=body(), headers={"content-length": str(length)})
                break
            except httpx.TransportError as e:
                if attempt == attempts - 1:
                    raise ClientError(f"uploading part {n} failed: {e}; run the command again to resume") from None
                time.sleep(2**attempt)
        if r.status_code >= 400:
            raise ClientError(f"the store refused part {n} ({r.status_code}): {r.text[:300]}")
        return r

    def download(self, url: str, dest: Path, sha256: str | None = None, progress: Callable[[int], None] | None = None) -> Path:
        """Stream a URL to dest (atomically), checking the sha256 when given."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with atomic.replacing(dest, dest.name + ".part") as tmp:
            try:
                with self.raw.stream("GET", url) as r:
                    if r.status_code >= 400:
                        raise ClientError(f"download of {dest.name} failed ({r.status_code}): {r.read()[:300]!r}")
                    with open(tmp, "wb") as f:
                        for b in r.iter_bytes(CHUNK):
                            f.write(b)
                            h.update(b)
                            if progress:
                                progress(len(b))
            except httpx.ConnectError:
                raise ClientError(f"cannot reach the store to download {dest.name}") from None
            except OSError as e:
                if e.errno == 28:
                    raise ClientError(f"the disk is full while writing {dest}: free some space and run the command again") from None
                raise
            if sha256 and h.hexdigest() != sha256:
                raise ClientError(f"{dest.name} arrived corrupted (sha256 mismatch); run the command again")
        return dest

    def download_files(self, files: dict[str, str], urls: dict[str, str], dest: Path,
                       log: Callable[[str], None] | None = None) -> Path:
        """Download a model's files ({name: sha256}, from {name: URL}) into `dest`, each checked
        against its sha256; a file already there with the right hash is kept."""
        dest.mkdir(parents=True, exist_ok=True)
        for name, sha in files.items():
            p = dest / name
            if p.exists() and sha256_file(p) == sha:
                continue
            if log:
                log(f"downloading {name}")
            self.download(urls[name], p, sha)
        return dest


def _json(x: Any) -> Any:
    """A record of the typed API in an error message: the JSON it was made from."""
    return getattr(x, "raw", repr(x))
