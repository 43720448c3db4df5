"""ASGI middleware: the API key, the payload limit, and the methods each path allows.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would hide a client's
disconnect from the routes (and so stop them aborting abandoned work).
"""
from __future__ import annotations

import hmac
import json

# TGI's "info" routes stay open when an API key is set; everything else needs it.
OPEN_ROUTES = {("GET", "/"), ("GET", "/health"), ("GET", "/ping"), ("GET", "/info"), ("GET", "/metrics"),
               ("GET", "/v1/models"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"),
               ("GET", "/openapi.json"), ("GET", "/api-doc/openapi.json")}


async def _plain(send, status: int, body: bytes = b"") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on every route but the open ones; 401 with an empty body
    otherwise. The comparison takes the same time whatever the guess."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"bearer {api_key}".lower().encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" \
                or (scope["method"], scope["path"]) in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"").lower()
        if not hmac.compare_digest(given, self.expected):
            return await _plain(send, 401)
        await self.app(scope, receive, send)


class PayloadLimitMiddleware:
    """413 for a body over `limit` bytes, judged by Content-Length before anything is read
    and by counting as it arrives (for chunked bodies). Past the limit the app is told the
    client left, and whatever it answers is replaced by the 413."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _plain(send, 413, _TOO_LARGE)
        received = 0
        too_large = False

        async def counted_receive():
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        answered = False

        async def guarded_send(message):
            nonlocal answered
            if not too_large:
                return await send(message)
            if not answered:
                answered = True
                await _plain(send, 413, _TOO_LARGE)

        await self.app(scope, counted_receive, guarded_send)


_TOO_LARGE = b"Failed to buffer the request body: length limit exceeded"


class MethodsMiddleware:
    """A method that a known path does not take: 405 with an `Allow` header naming every method
    the path takes (Starlette would name only those of the first route on it: `GET /` and
    `POST /` are two routes), in TGI's error body; `OPTIONS` answers 204 with the same header.
    CORS preflights (with Access-Control-Request-Method) are left to the CORS middleware. The
    methods are those the OpenAPI document gives each path (HEAD with GET, as Starlette adds)."""

    def __init__(self, app, documented):
        self.app = app
        self.documented = documented  # () -> the OpenAPI document's paths, read at the first request
        self.methods: dict[str, set[str]] | None = None

    async def __call__(self, scope, receive, send) -> None:
        if self.methods is None and scope["type"] == "http":
            self.methods = {path: {m.upper() for m in ops} | ({"HEAD"} if "get" in ops else set())
                            for path, ops in self.documented().items()}
        allowed = self.methods.get(scope.get("path")) if scope["type"] == "http" else None
        method = scope.get("method")
        if allowed is None or method in allowed:
            return await self.app(scope, receive, send)
        if method == "OPTIONS" and b"access-control-request-method" in dict(scope["headers"]):
            return await self.app(scope, receive, send)
        allow = ", ".join(sorted(allowed | {"OPTIONS"})).encode()
        if method == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": [(b"allow", allow)]})
            return await send({"type": "http.response.body", "body": b""})
        body = json.dumps({"error": "Method Not Allowed", "error_type": "method_not_allowed"}).encode()
        await send({"type": "http.response.start", "status": 405,
                    "headers": [(b"allow", allow), (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
