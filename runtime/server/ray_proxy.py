"""Runs inside Ray Serve's HTTP proxy, not in a replica: a replica that dies mid-request still leaves its client a
clean OpenAI-shaped error instead of a bare 500 or a cut connection.

When the replica serving a request dies (killed, out of memory, node lost), Ray's proxy has nothing to forward:
before the response started, the proxy's HTTP server answers a plain-text 500; once a stream started, the
connection is closed mid-body. This ASGI middleware, installed into the proxy by Ray's documented hook

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=phi3v_edge.runtime.server.ray_proxy:middlewares

(set in the environment of `ray start` on every node; ray_cli.LocalRayHead sets it), answers instead:

    not started yet         503 {"error": {"type": "server_error", "code": "replica_failed", ...}}, Retry-After
                            (the official clients retry it, and the retry lands on a live replica)
    a stream had started    an SSE error event, then `data: [DONE]` (only on our replicas' streams: the
                            response carries x-phi3v-replica)

It acts on `.../v1/chat/completions` only and leaves every other route and application on the proxy alone.
Standard library plus Starlette's Middleware class.
"""
from __future__ import annotations

import json
import logging

from .protocol import error_body
from .ray_cli import REPLICA_HEADER

log = logging.getLogger("phi3v_edge.ray_proxy")
ROUTE_SUFFIX = "/v1/chat/completions"
FAILED_MESSAGE = ("the replica serving this request stopped before it finished (it was killed or crashed); "
                  "the endpoint's other replicas keep serving: retry the request")


def replica_failed_body() -> dict:
    return error_body(FAILED_MESSAGE, "server_error", None, "replica_failed")


class ReplicaFailure:
    """ASGI middleware for the proxy: see the module docstring."""

    def __init__(self, app, retry_after: int = 1):
        self.app, self.retry_after = app, retry_after

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").endswith(ROUTE_SUFFIX):
            return await self.app(scope, receive, send)
        st = {"started": False, "ours": False, "sse": False, "complete": False}

        async def watch(message):
            kind = message["type"]
            if kind == "http.response.start":
                st["started"] = True
                headers = {bytes(k).lower(): bytes(v) for k, v in message.get("headers", [])}
                st["ours"] = REPLICA_HEADER.encode() in headers
                st["sse"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif kind == "http.response.body" and not message.get("more_body", False):
                st["complete"] = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("proxy error on %s", scope.get("path"))
        try:
            if not st["started"]:
                body = json.dumps(replica_failed_body()).encode()
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"retry-after", str(self.retry_after).encode())]})
                await send({"type": "http.response.body", "body": body, "more_body": False})
            elif st["ours"] and st["sse"] and not st["complete"]:
                event = json.dumps(replica_failed_body(), separators=(",", ":"))
                await send({"type": "http.response.body", "body": f"data: {event}\n\ndata: [DONE]\n\n".encode(),
                            "more_body": False})
        except Exception as e:  # noqa: BLE001 - the client is gone too
            log.debug("could not answer %s: %s", scope.get("path"), e)


def middlewares() -> list:
    """Ray's proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): the proxy's Starlette middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaFailure)]
