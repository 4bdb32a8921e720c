"""ASGI middleware: the request body limit, JSON bodies sent without a JSON content type, and
CORS for widget keys.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed answers.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import error_body

VISITOR_HEADER = "x-prefloop-visitor"  # a widget visitor's signed id (service.auth.VisitorIds)
ALLOWED_HEADERS = f"authorization, content-type, idempotency-key, x-request-id, {VISITOR_HEADER}"
EXPOSED_HEADERS = f"retry-after, idempotent-replayed, {VISITOR_HEADER}"


async def _send_json(send: Send, status: int, body: dict, headers: list | None = None) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


class BodyLimit:
    """Refuse a request body over `max_bytes` with a 413 before any route parses it: by its
    Content-Length, or (chunked uploads) once that many bytes have arrived."""

    def __init__(self, app: ASGIApp, max_bytes: int, uploads: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        # Paths that take large bodies (adapter uploads): their own limit, checked on the
        # Content-Length (which the HTTP server holds the body to), and streamed, not buffered.
        self.uploads = uploads or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        upload = self.uploads.get(scope["path"]) if scope["method"] == "POST" else None
        if upload is not None:
            if length is None:
                body = error_body(
                    "an upload needs a Content-Length header",
                    "invalid_request_error",
                    code="length_required",
                )
                await _send_json(send, 411, body)
                return
            if not length.isdigit() or int(length) > upload:
                await self._refuse(send, upload, "PREFLOOP_MAX_UPLOAD_BYTES")
                return
            await self.app(scope, receive, send)
            return
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send)
            return
        # Read the body here (it is at most max_bytes), then replay it to the app.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads wait for the disconnect, as usual

        await self.app(scope, replay, send)

    async def _refuse(
        self, send: Send, limit: int | None = None, setting: str = "PREFLOOP_MAX_BODY_BYTES"
    ) -> None:
        body = error_body(
            f"the request body is larger than {limit or self.max_bytes} bytes ({setting}); "
            "send less",
            "invalid_request_error",
            code="request_too_large",
        )
        await _send_json(send, 413, body)


class JsonBody:
    """Read every request body as JSON, whatever its content type, except multipart forms.

    `curl -d '{...}'` sends `application/x-www-form-urlencoded`, other clients `text/plain` or
    no type at all; FastAPI would only parse `application/json` and then refuse the raw bytes
    ("Input should be a valid dictionary"). No route here takes a urlencoded form, so the type
    is rewritten to JSON; a body that is not JSON then gets the JSON-decode 400, which says to
    send JSON (`service.core.errors`). Multipart (adapter uploads) is left as it came.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            kind = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
            if not (kind.startswith(b"multipart/") or kind.endswith((b"/json", b"+json"))):
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class KeyCors:
    """CORS from the keys' own allow-lists.

    A preflight carries no key, so it is allowed for an origin any live public key names
    (`allowed()`); the request that follows is checked against its own key's origins by the
    role dependency. Development mode (`allowed` None) allows every origin.
    """

    def __init__(self, app: ASGIApp, allowed: Callable[[], frozenset[str] | None]):
        self.app = app
        self.allowed = allowed

    def _ok(self, origin: str) -> bool:
        allowed = self.allowed()
        return allowed is None or origin.rstrip("/") in allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        origin = headers.get(b"origin", b"").decode("latin-1")
        if not origin:
            await self.app(scope, receive, send)
            return
        preflight = scope["method"] == "OPTIONS" and b"access-control-request-method" in headers
        if preflight:
            if not self._ok(origin):
                await _send_json(
                    send,
                    403,
                    error_body(f"origin {origin} is not allowed by any key", "permission_error"),
                    [(b"vary", b"Origin")],
                )
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": [
                        (b"access-control-allow-origin", origin.encode("latin-1")),
                        (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS"),
                        (b"access-control-allow-headers", ALLOWED_HEADERS.encode()),
                        (b"access-control-max-age", b"600"),
                        (b"vary", b"Origin"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        ok = self._ok(origin)

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start" and ok:
                issued = scope.get("state", {}).get("visitor_token")  # a new widget visitor
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (b"access-control-allow-origin", origin.encode("latin-1")),
                        (b"access-control-expose-headers", EXPOSED_HEADERS.encode()),
                        (b"vary", b"Origin"),
                        *([(VISITOR_HEADER.encode(), issued.encode())] if issued else []),
                    ],
                }
            await send(message)

        await self.app(scope, receive, send_with_cors)
