"""The ASGI app (Starlette): OpenAI-compatible routes over one batching Engine.

    POST /v1/chat/completions   JSON or server-sent events (stream: true)
    GET  /v1/models             the one served model
    GET  /health                200 {"status": "ready"} once the engine is warmed up; 503 while loading / draining
    GET  /metrics               Prometheus text format (metrics.py)

A request's path: API key (on /v1/* only) -> body (413 over --max-body-bytes) -> JSON -> protocol.parse_chat_request
(400 / 404) -> images (images.py, in a thread) -> chat template -> Engine.submit in a thread (tokenization,
image transform and the vision encoder run there; InputError -> 400, EngineBusy -> 503 with Retry-After) -> the
handle's deltas, streamed as chunks or gathered into one completion. A client that goes away cancels its
request (its slot is freed at the engine's next step); --request-timeout cancels it too and answers 504 (or,
once a stream has started, an error event). Every error is answered in OpenAI's shape; a 500 means a bug.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..chat_template import build_prompt
from ..errors import EngineBusy, EngineClosed, InputError, RequestCancelled
from ..request import FINISH_CANCELLED
from . import protocol as P
from .images import resolve_image
from .metrics import CONTENT_TYPE_LATEST, Metrics

log = logging.getLogger("phi3v_edge.server")
INLINE_CHARS = 256 * 1024  # image data URLs up to this size in all are decoded on the event loop


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_images: int = 8
    max_image_bytes: int = 20 * 1024 * 1024
    max_body_bytes: int = 32 * 1024 * 1024
    allow_image_urls: bool = False
    image_fetch_timeout: float = 10.0
    request_timeout: float | None = 600.0
    retry_after: int = 1  # seconds, on 503 (queue full, loading, draining)
    drain_timeout: float = 30.0


class ServerState:
    def __init__(self, engine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.ready = False
        self.draining = False
        self.error: str | None = None  # warm-up failure
        self.metrics = Metrics(engine.stats)
        self.limits = P.Limits(config.model_name, engine.max_batch, engine.max_length, config.max_images,
                               config.allow_image_urls)
        self.created = int(time.time())


# ---- helpers --------------------------------------------------------------------------------------------
def _json(body: dict, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _error_response(state: ServerState, e: P.APIError) -> JSONResponse:
    state.metrics.errors.labels(str(e.status)).inc()
    return _json(e.body(), e.status, e.headers)


def _unavailable(state: ServerState, why: str, code: str) -> P.APIError:
    return P.APIError(503, why, type="server_error", code=code,
                      headers={"Retry-After": str(state.config.retry_after)})


def _check_key(state: ServerState, request: Request) -> None:
    key = state.config.api_key
    if not key:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    if not given or not hmac.compare_digest(given.encode(), key.encode()):
        raise P.APIError(401, "missing or wrong API key (send the header 'Authorization: Bearer <key>')",
                         type="authentication_error", code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = P.APIError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-bytes)",
                         code="request_too_large")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > 8 * limit:
        raise too_big  # not worth reading: the connection is closed after the answer
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            parts.append(chunk)
    if size > limit:  # read to the end, so the client gets the 413 instead of a broken pipe
        raise too_big
    return b"".join(parts)


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise P.bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise P.bad_request("the request body is nested too deeply", code="invalid_json") from None


def _input_error(e: Exception) -> P.APIError:
    msg = str(e) or type(e).__name__
    return P.bad_request(msg, "messages", code="context_length_exceeded" if "max_length" in msg else None)


def _sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class _Clock:
    """Per-request latency bookkeeping for the metrics: first token, gaps between a row's tokens."""

    def __init__(self, metrics: Metrics, arrival: float):
        self.m, self.arrival = metrics, arrival
        self.first: float | None = None
        self.first_text: float | None = None  # streams: when the first chunk with text went out
        self.last: dict[int, float] = {}

    def tokens(self, index: int, count: int) -> None:
        if count <= 0:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.m.ttft.observe(now - self.arrival)
        prev = self.last.get(index)
        if prev is not None:
            gap = (now - prev) / count
            for _ in range(count):
                self.m.itl.observe(gap)
        self.last[index] = now


# ---- the chat route -------------------------------------------------------------------------------------
async def _prepare(state: ServerState, request: Request) -> tuple[P.ChatRequest, str, list]:
    raw = await _read_body(request, state.config.max_body_bytes)
    req = P.parse_chat_request(_parse_json(raw), state.limits)
    cfg = state.config
    if req.images:
        def resolve():
            return [_clip_frames(state, req, ref) if ref.video is not None else
                    [resolve_image(ref, allow_urls=cfg.allow_image_urls, max_bytes=cfg.max_image_bytes,
                                   timeout=cfg.image_fetch_timeout)] for ref in req.images]

        # small image data URLs decode in microseconds: a thread hand-off would cost more than it saves
        inline = sum(len(r.url) for r in req.images) < INLINE_CHARS and all(
            r.video is None and r.url.startswith("data:") for r in req.images)
        datas = resolve() if inline else await asyncio.to_thread(resolve)
        by_id = {id(ref): d for ref, d in zip(req.images, datas)}
        for m in req.messages:  # a video_url part is its sampled frames
            m["images"] = [im for ref in m["images"] for im in by_id[id(ref)]]
    try:
        prompt, images = build_prompt(req.messages)
    except (ValueError, TypeError) as e:
        raise P.bad_request(str(e), "messages") from None
    return req, prompt, images


def _clip_frames(state: ServerState, req: P.ChatRequest, ref: P.ImageRef) -> list:
    """A video_url part -> its sampled frames (runtime/video.py; data URLs only; budget-checked before decoding)."""
    from ..video import frames_from_data_url

    eng, kw = state.engine, req.submit_kwargs
    try:
        return frames_from_data_url(ref.url, ref.video["frames"], ref.video["fps"], processor=eng.processor,
                                    num_crops=kw["num_crops"], max_length=eng.max_length,
                                    max_new_tokens=kw["max_new_tokens"] or 1).frames
    except InputError as e:  # VideoError: not a data URL, corrupt clip, bad num_frames / fps, over max_length
        raise P.bad_request(f"{ref.param}: {e}", ref.param, code="invalid_video") from None


async def _submit(state: ServerState, req: P.ChatRequest, prompt: str, images: list):
    eng, kw = state.engine, dict(req.submit_kwargs)
    try:
        if kw["max_new_tokens"] is None:  # OpenAI's default: as many as the context leaves
            used = await asyncio.to_thread(eng.count_tokens, prompt, images, kw["num_crops"])
            kw["max_new_tokens"] = eng.max_length - used
            if kw["max_new_tokens"] < 1:
                raise P.bad_request(f"the prompt is {used} tokens, which leaves no room to generate within this "
                                    f"server's max_length {eng.max_length}", "messages",
                                    code="context_length_exceeded")
        return await asyncio.to_thread(eng.submit, prompt, images, **kw)
    except (InputError, ValueError) as e:  # ImageError is an InputError
        raise _input_error(e) from None
    except EngineBusy:
        raise _unavailable(state, "the server is busy (its waiting queue is full): retry shortly",
                           "server_overloaded") from None
    except EngineClosed:
        raise _unavailable(state, "the server is shutting down", "shutting_down") from None


def _timeout_error(state: ServerState) -> P.APIError:
    return P.APIError(504, f"the request did not finish within this server's --request-timeout of "
                           f"{state.config.request_timeout:g} s", type="timeout_error", code="request_timeout")


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    arrival = time.perf_counter()
    try:
        _check_key(state, request)
        if state.draining:
            raise _unavailable(state, "the server is shutting down", "shutting_down")
        if not state.ready:
            raise _unavailable(state, state.error or "the model is still loading", "model_loading")
        req, prompt, images = await _prepare(state, request)
        handle = await _submit(state, req, prompt, images)
    except P.APIError as e:
        return _error_response(state, e)
    except ClientDisconnect:  # gone while sending its body: nobody to answer
        return Response(status_code=400)
    timer = _Timer(state, handle, arrival)
    if req.stream:
        return StreamingResponse(_stream(state, req, handle, arrival, timer), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(state, req, handle, arrival, timer, request)


def _timings(results, handle, arrival: float, clock: _Clock) -> list[dict]:
    """The `timings` extra: each row's engine timings, plus the server's own share of the first token's wait:
    server_before_submit (request start -> Engine.submit called: body, JSON, images, a free worker thread),
    server_token_to_loop (the engine's first token -> the event loop has it) and, on a stream,
    first_text_after_token (the first token -> the first delta with text: tokens without text of their own, such
    as part of a multi-byte character, wait for the next ones; the engine's streaming, not the server's cost);
    server_clock_* are raw time.perf_counter() readings (the request's start, the first text chunk sent), which a
    client on the same Linux machine can set against its own (both read CLOCK_MONOTONIC)."""
    out = []
    for r in results:
        t = dict(r.timings)
        t["server_before_submit"] = handle.created - arrival
        if clock.first is not None and "ttft" in t:
            t["server_token_to_loop"] = clock.first - (handle.created + t["ttft"])
            if clock.first_text is not None:
                t["first_text_after_token"] = clock.first_text - clock.first
                t["server_clock_first_text"] = clock.first_text
        t["server_clock_arrival"] = arrival  # time.perf_counter(): CLOCK_MONOTONIC, comparable across processes
        out.append(t)
    return out


class _Timer:
    """--request-timeout: cancels the handle at the deadline and remembers that it did."""

    def __init__(self, state: ServerState, handle, arrival: float):
        self.fired = False
        self._h = None
        limit = state.config.request_timeout
        if limit:
            delay = max(0.0, arrival + limit - time.perf_counter())
            self._h = asyncio.get_running_loop().call_later(delay, self._fire, handle)

    def _fire(self, handle) -> None:
        if not handle.done:
            self.fired = True
            handle.cancel()

    def stop(self) -> None:
        if self._h is not None:
            self._h.cancel()


async def _complete(state: ServerState, req: P.ChatRequest, handle, arrival: float, timer: _Timer,
                    request: Request) -> Response:
    clock = _Clock(state.metrics, arrival)
    gone = asyncio.Event()

    async def watch():  # a client that hangs up cancels its request
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                gone.set()
                handle.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        async for d in handle:
            clock.tokens(d.index, len(d.token_ids))
        results = handle.results(timeout=0)
    except RequestCancelled:  # the engine failed it as cancelled (timeout, shutdown, or the client left)
        results = None
    except Exception as e:  # the engine failed this request: not the user's fault, but say what happened
        log.exception("request %s failed", handle.id)
        return _error_response(state, P.APIError(500, f"generation failed: {e}", type="server_error"))
    finally:
        timer.stop()
        watcher.cancel()
        if not handle.done:
            handle.cancel()
    if timer.fired:
        return _error_response(state, _timeout_error(state))
    if results is None or any(r.finish_reason == FINISH_CANCELLED for r in results):
        if gone.is_set():
            return Response(status_code=499)  # nobody is listening
        return _error_response(state, _unavailable(state, "the request was cancelled: the server is shutting down",
                                                   "shutting_down"))
    state.metrics.finished(results, arrival, time.perf_counter())
    body = P.completion_body(P.new_id(), req.model, int(time.time()), results, state.engine.tokenizer,
                             req.logprobs)
    if req.timings:
        body["timings"] = _timings(results, handle, arrival, clock)
    return _json(body)


async def _stream(state: ServerState, req: P.ChatRequest, handle, arrival: float, timer: _Timer):
    rid, created, model = P.new_id(), int(time.time()), req.model
    clock = _Clock(state.metrics, arrival)
    tk = state.engine.tokenizer

    def chunk(choices, usage=None):
        return _sse(P.chunk_body(rid, model, created, choices, usage, req.include_usage))

    try:
        yield chunk([P.chunk_choice(i, {"role": "assistant", "content": ""}) for i in range(req.n)])
        cancelled = False
        async for d in handle:
            clock.tokens(d.index, len(d.token_ids))
            if d.finish_reason == FINISH_CANCELLED:
                cancelled = True
                continue
            lp = P.logprobs_body(tk, d.logprobs) if req.logprobs and d.logprobs else None
            if d.text or lp:
                if clock.first_text is None and d.text:
                    clock.first_text = time.perf_counter()
                yield chunk([P.chunk_choice(d.index, {"content": d.text}, logprobs=lp)])
            if d.finish_reason:
                yield chunk([P.chunk_choice(d.index, {}, d.finish_reason)])
        results = handle.results(timeout=0)
        cancelled = cancelled or any(r.finish_reason == FINISH_CANCELLED for r in results)
        if timer.fired:
            err = _timeout_error(state)
        elif cancelled:
            err = _unavailable(state, "the request was cancelled: the server is shutting down", "shutting_down")
        else:
            err = None
        if err is not None:
            state.metrics.errors.labels(str(err.status)).inc()
            yield _sse(err.body())
        else:
            state.metrics.finished(results, arrival, time.perf_counter())
            if req.timings:
                body = P.chunk_body(rid, model, created, [], None, req.include_usage)
                body["timings"] = _timings(results, handle, arrival, clock)
                yield _sse(body)
            if req.include_usage:
                yield chunk([], P.usage_of(results))
        yield _sse("[DONE]")
    except RequestCancelled:
        err = _timeout_error(state) if timer.fired else _unavailable(state, "the request was cancelled: the server "
                                                                           "is shutting down", "shutting_down")
        state.metrics.errors.labels(str(err.status)).inc()
        yield _sse(err.body())
        yield _sse("[DONE]")
    except Exception as e:  # not CancelledError (a client that went away): that goes to `finally`
        log.exception("request %s failed", handle.id)
        yield _sse(P.error_body(f"generation failed: {e}", "server_error"))
        yield _sse("[DONE]")
    finally:  # also when the client went away (the generator is cancelled/closed)
        timer.stop()
        if not handle.done:
            handle.cancel()


# ---- other routes ---------------------------------------------------------------------------------------
async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    try:
        _check_key(state, request)
    except P.APIError as e:
        return _error_response(state, e)
    return _json(P.models_body(state.config.model_name, state.created))


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.server
    if state.draining:
        return _json({"status": "draining"}, 503, {"Retry-After": str(state.config.retry_after)})
    if not state.ready:
        body = {"status": "error", "error": state.error} if state.error else {"status": "loading"}
        return _json(body, 503, {"Retry-After": str(state.config.retry_after)})
    return _json({"status": "ready", "model": state.config.model_name, **state.engine.stats()})


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _json(P.error_body(f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error", None,
                              code), exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _json(P.error_body("internal server error (a bug: see the server log)", "server_error"), 500)


# ---- the app --------------------------------------------------------------------------------------------
def create_app(engine, config: ServerConfig, warmup: bool = True) -> Starlette:
    """The app over a started Engine. warmup: run engine.warmup() at startup (in a thread) before /health says
    ready. On shutdown the engine is shut down (in-flight requests get config.drain_timeout)."""
    state = ServerState(engine, config)

    @asynccontextmanager
    async def lifespan(app):
        async def warm():
            try:
                if warmup:
                    await asyncio.to_thread(engine.warmup)
                state.ready = True
                log.info("ready: %s", config.model_name)
            except Exception as e:  # noqa: BLE001 - reported by /health and the log
                state.error = f"warm-up failed: {e}"
                log.error(state.error)

        task = asyncio.ensure_future(warm())
        try:
            yield
        finally:
            state.draining = True
            task.cancel()
            await asyncio.to_thread(engine.shutdown, config.drain_timeout)

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={HTTPException: _http_error, Exception: _server_error}, lifespan=lifespan)
    app.state.server = state
    return app
