"""The coordinator's API as Python methods, with uploads and downloads that resume.

Errors come back as ClientError carrying the server's message, which already says what
was wrong and what to do; a coordinator that cannot be reached says so with its URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from btm import atomic
from btm.hashing import sha256_file  # noqa: F401 - part of this module's API
from btm.model_files import is_upload_file, is_weights_file

CHUNK = 1 << 20
T = TypeVar("T")


class ClientError(Exception):
    def __init__(self, message: str, status: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.status = status
        self.body = body or {}


IDEMPOTENT = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}


class Client:
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

    # ------------------------------------------------------------------ accounts, domains, forests

    def register(self, username: str, password: str, invite: str | None = None) -> dict:
        return self.post("/auth/register", {"username": username, "password": password, "invite": invite})

    def login(self, username: str, password: str) -> dict:
        return self.post("/auth/login", {"username": username, "password": password, "token_name": "cli"})

    def me(self) -> dict:
        return self.get("/me")

    def domains(self) -> list[dict]:
        return self.get("/domains")

    def domain(self, name: str) -> dict:
        return self.get(f"/domains/{name}")

    def create_domain(self, name: str, **fields) -> dict:
        return self.post("/domains", {"name": name, **fields})

    def set_eval_data(self, name: str, path: Path, progress=None) -> dict:
        art = self.upload(path, "eval-data", progress=progress)
        return self.request("PUT", f"/domains/{name}/eval-data", json={"sha256": art["sha256"]})

    def forests(self) -> list[dict]:
        return self.get("/forests")

    def forest(self, name: str) -> dict:
        return self.get(f"/forests/{name}")

    def upload_model(self, model_dir: Path, progress=None) -> dict[str, str]:
        """Upload a model directory's files (not its training state); {filename: sha256}."""
        files = {}
        for f in sorted(Path(model_dir).iterdir()):
            if f.is_file() and is_upload_file(f.name):
                purpose = "weights" if is_weights_file(f.name) else "model-file"
                files[f.name] = self.upload(f, purpose, progress=progress)["sha256"]
        return files

    def create_forest(self, name: str, model_dir: Path, description: str = "", progress=None) -> dict:
        return self.post("/forests", {"name": name, "description": description,
                                      "files": self.upload_model(model_dir, progress)})

    # ------------------------------------------------------------------ jobs

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

    def job(self, job_id: int) -> dict:
        return self.get(f"/jobs/{job_id}")

    def finish(self, job: dict, what: str) -> dict:
        """Wait for a job the coordinator started; its result, or a ClientError naming `what` failed."""
        job = self.wait(lambda: self.job(job["id"]), lambda x: x["status"] in ("succeeded", "failed"))
        if job["status"] == "failed":
            raise ClientError(f"{what} failed: {job['error']}")
        return job

    # ------------------------------------------------------------------ uploads

    def upload(self, path: Path, purpose: str, sha256: str | None = None, state_file: Path | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict:
        """Upload a file in parts; returns the finished upload {upload_id, sha256, size, ...}.
        With a state file, an interrupted upload resumes from the parts that already arrived."""
        path = Path(path)
        size = path.stat().st_size
        sha256 = sha256 or sha256_file(path)
        info = None
        if state_file and state_file.exists():
            saved = json.loads(state_file.read_text())
            if saved.get("sha256") == sha256 and saved.get("upload_id"):
                try:
                    info = self.get(f"/uploads/{saved['upload_id']}")
                except ClientError as e:
                    info = None
                    if e.status == 409:  # finished already (the answer was lost)? then done
                        with contextlib.suppress(ClientError):
                            done = self.complete(f"/uploads/{saved['upload_id']}/complete")
                            if done.get("status") == "complete":
                                state_file.unlink(missing_ok=True)
                                return done
        if info is None:
            info = self.post("/uploads", {"purpose": purpose, "filename": path.name, "sha256": sha256, "size": size})
            if state_file:
                state_file.write_text(json.dumps({"sha256": sha256, "upload_id": info["upload_id"]}))
        self.put_parts(path, info, progress)
        art = self.complete(f"/uploads/{info['upload_id']}/complete")
        if state_file:
            state_file.unlink(missing_ok=True)
        return art

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
