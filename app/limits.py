"""Request limits: the body size cap (413) and the configured bounds on search parameters (422)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from indexer.config import Settings

from .errors import InvalidRequest

# The most of a refused body read (and thrown away) so that its client gets the answer; see below.
DRAIN_BYTES = 64 * 1024 * 1024


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413: at once when Content-Length says so, else while streaming.

    The rest of a refused body is read and thrown away before the answer, up to `drain_bytes` in all.
    An HTTP/1.1 client sends its whole body before it reads the response; a server that closes the
    connection with data unread makes the kernel reset it, and the client then sees a connection error
    instead of the 413. Memory stays bounded (nothing is kept); past `drain_bytes` nothing more is read
    and the answer says `Connection: close`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int = DRAIN_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = max(drain_bytes, max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _reply(send, 400, "bad_request", "invalid Content-Length header")
                return
            if declared > self.max_bytes:
                drained = declared <= self.drain_bytes and await _drain(receive, self.drain_bytes)
                await _reply(send, 413, "body_too_large", self._message(), close=not drained)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    drained = not message.get("more_body", False) or await _drain(receive, self.drain_bytes - seen)
                    # Raised inside the app, so the app's handlers turn it into the 413 response.
                    raise HTTPException(413, self._message(), headers=None if drained else {"Connection": "close"})
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body larger than {self.max_bytes} bytes (PAPERINDEX_MAX_BODY_BYTES)"


async def _drain(receive: Receive, budget: int) -> bool:
    """Read the rest of the request body and drop it. True when it ended within `budget` bytes."""
    while budget >= 0:
        message = await receive()
        if message["type"] != "http.request":
            return False  # the client went away
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return budget >= 0
    return False


async def _reply(send: Send, status: int, code: str, detail: str, close: bool = True) -> None:
    body = json.dumps({"detail": detail, "code": code}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def check_bounds(s: Settings, q: str | None = None, k: int | None = None, candidates: int | None = None,
                 year_from: int | None = None, year_to: int | None = None, where: str = "query") -> None:
    """The bounds that depend on Settings; all violations reported together as one 422."""
    errors: list[tuple[tuple[str | int, ...], str]] = []
    if q is not None:
        if not q.strip():
            errors.append(((where, "q"), "must not be empty"))
        elif len(q) > s.max_query_chars:
            errors.append(((where, "q"), f"must be at most {s.max_query_chars} characters (got {len(q)})"))
    for name, value, top in (("k", k, s.max_k), ("candidates", candidates, s.max_candidates)):
        if value is not None and not 1 <= value <= top:
            errors.append(((where, name), f"must be between 1 and {top} (got {value})"))
    if year_from is not None and year_to is not None and year_from > year_to:
        errors.append(((where, "year_to"), f"must not be before year_from ({year_to} < {year_from})"))
    if errors:
        raise InvalidRequest(errors)
