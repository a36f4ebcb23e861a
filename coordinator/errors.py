"""Errors the service layer raises; the API turns each into a 4xx with a JSON body
{"error": {"code": ..., "message": ...}} whose message says what was wrong and what to do."""

import re


class ServiceError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class TooLarge(ServiceError):
    status, code = 413, "too_large"


class Unprocessable(ServiceError):
    status, code = 422, "unprocessable"


class TooMany(ServiceError):
    """Over a rate limit; `retry_after` seconds until the next attempt may succeed."""

    status, code = 429, "too_many_requests"

    def __init__(self, message: str, retry_after: int = 60, **details):
        super().__init__(message, **details)
        self.headers = {"Retry-After": str(max(1, int(retry_after)))}


_PATH = re.compile(r"(?<![\w.~:/-])(?:/[\w.@+~-]+){2,}/?")


def public(message: str) -> str:
    """A message fit to show a remote user: every absolute server path cut to its last part
    (`/srv/elmforest/work/models/ab12/model.safetensors` -> `model.safetensors`)."""
    return _PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1], message)
