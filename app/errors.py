"""Every error becomes a typed JSON response here, and only here: `{detail, code, errors?}`, no stack traces."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from indexer.errors import ModelLoadError
from indexer.search import NoReranker, NotFound
from indexer.store import OldIndex, StoreError, StoreUnavailable

from .schemas import ErrorResponse

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """A request that passed schema validation but breaks a configured bound (k, candidates, query length)."""

    def __init__(self, errors: list[tuple[tuple[str | int, ...], str]]) -> None:
        self.errors = errors
        parts = (f"{'.'.join(str(p) for p in loc[1:] or loc)}: {msg}" for loc, msg in errors)
        super().__init__("; ".join(parts) or "invalid request")


class Unauthorized(Exception):
    """A write without the right API key."""


class QueueFull(RuntimeError):
    """The index queue is at capacity."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(QueueFull):
    """Too many searches in flight: refused at once rather than queued behind the others."""


class ShuttingDown(RuntimeError):
    """The server stopped before a queued job ran."""


class UnknownJob(LookupError):
    """A job id this process does not know (never issued, expired, or issued before a restart)."""


@dataclass(frozen=True)
class Mapped:
    status: int
    code: str
    detail: str
    headers: dict[str, str] | None = None


# Order matters: subclasses before their bases (StoreUnavailable is a StoreError).
_TABLE: list[tuple[type[BaseException], int, str]] = [
    (NotFound, 404, "not_found"),
    (UnknownJob, 404, "unknown_job"),
    (NoReranker, 400, "no_reranker"),
    (ModelLoadError, 400, "not_configured"),
    (Unauthorized, 401, "unauthorized"),
    (InvalidRequest, 422, "invalid_request"),
    (Overloaded, 429, "overloaded"),
    (QueueFull, 429, "queue_full"),
    (StoreUnavailable, 503, "store_unavailable"),
    (OldIndex, 409, "old_index"),
    (ShuttingDown, 503, "shutting_down"),
    (StoreError, 500, "store_error"),
]


def classify(exc: BaseException) -> Mapped:
    """The HTTP status, code and message for an exception (used by the handlers and by failed index jobs)."""
    for cls, status, code in _TABLE:
        if isinstance(exc, cls):
            headers = None
            if isinstance(exc, QueueFull):
                headers = {"Retry-After": str(exc.retry_after)}
            elif isinstance(exc, StoreUnavailable):
                headers = {"Retry-After": "5"}
            elif isinstance(exc, Unauthorized):
                headers = {"WWW-Authenticate": 'Bearer realm="paperindex"'}
            return Mapped(status, code, str(exc), headers)
    return Mapped(500, "internal_error", "internal error; the server log has the details")


def _body(m: Mapped, errors: list[dict] | None = None) -> dict:
    out: dict = {"detail": m.detail, "code": m.code}
    if errors is not None:
        out["errors"] = errors
    return out


def error_response(exc: BaseException) -> JSONResponse:
    m = classify(exc)
    errors = [{"loc": list(loc), "msg": msg} for loc, msg in exc.errors] if isinstance(exc, InvalidRequest) else None
    return JSONResponse(_body(m, errors), status_code=m.status, headers=m.headers)


_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
}


def _validation_message(err: dict) -> tuple[tuple[str | int, ...], str]:
    msg = "unknown parameter" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
    return tuple(err.get("loc", ())), msg


def install(app: FastAPI) -> None:
    """Register the handlers on an app."""

    async def domain(request: Request, exc: Exception) -> JSONResponse:
        m = classify(exc)
        if m.status >= 500:
            log.warning("%s %s -> %d %s: %s", request.method, request.url.path, m.status, m.code, exc)
        return error_response(exc)

    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(InvalidRequest([_validation_message(e) for e in exc.errors()]))

    async def http(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse({"detail": str(exc.detail), "code": code}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this handler, so the server log gets the traceback; the client gets none.
        # uvicorn then closes the connection: say so, or a keep-alive client's next request on it is reset.
        return JSONResponse(_body(classify(exc)), status_code=500, headers={"Connection": "close"})

    for cls, _, _ in _TABLE:
        app.add_exception_handler(cls, domain)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(Exception, internal)


# Error responses every API route can give, for the OpenAPI document.
COMMON: dict[int | str, dict] = {
    422: {"model": ErrorResponse, "description": "invalid parameters or body"},
    500: {"model": ErrorResponse, "description": "internal error (details in the server log only)"},
}
