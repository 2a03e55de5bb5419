"""The OpenAI chat-completions wire format: request body -> engine.submit arguments, results -> JSON bodies.

Plain Python (no web framework), so every rule here is testable without a server:

    req = parse_chat_request(body, limits)       # raises APIError (400/404) with the field that was wrong
    req.messages -> build_prompt messages, with ImageRef entries for the image parts (fetched by images.py)
    req.submit_kwargs -> keyword arguments of Engine.submit (max_new_tokens, do_sample, temperature, ...)
    completion_body(...), chunk_body(...), usage_body(...), error_body(...)  # the response shapes

What is accepted: roles system / developer (as system) / user / assistant; content as a string or a list of
{"type": "text"} and {"type": "image_url"} parts (images in user messages only; a message's images come
before its text, as in the model's chat template; several text parts are joined with a newline), and
{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,...", "num_frames": N | "fps": F}} parts
(a clip: its sampled frames are the message's images, runtime/video.py);
max_tokens / max_completion_tokens, temperature (0 = greedy; OpenAI's default 1.0 samples), top_p, seed, stop
(a string or up to 4), n, logprobs / top_logprobs (<= 5), stream / stream_options.include_usage, and the
extras top_k, repetition_penalty, num_crops, ignore_eos (as in vLLM: the model's stop tokens do not end
the reply) and timings (the engine's own seconds per row, in a "timings" field: completion body, or a chunk with
no choices before the usage chunk). frequency_penalty / presence_penalty other than 0, logit_bias, tools,
function calling and non-text response formats are rejected with a 400 that names the field. Other unknown
fields are ignored (clients send `user`, `metadata`, ...).
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 5
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED_FIELDS = {  # field -> the values that are fine (null or a no-op; anything else: 400)
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "prediction": (None,),
}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    """What the server accepts (the `serve` options)."""
    model_name: str
    max_batch: int
    max_length: int
    max_images: int = 8
    allow_image_urls: bool = False


@dataclass
class ImageRef:
    """An image part as sent: a data URL or an http(s) URL (resolved to bytes by images.py)."""
    url: str
    param: str  # where it was in the body, e.g. "messages[0].content[1].image_url"
    video: dict | None = None  # a video_url part: {"frames": N | None, "fps": F | None}, sampled by runtime/video.py


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]  # build_prompt messages; their "images" hold ImageRef until resolved
    submit_kwargs: dict[str, Any]  # Engine.submit keyword arguments (max_new_tokens may be None: fill in later)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    n: int = 1
    images: list[ImageRef] = field(default_factory=list)  # all image refs, in prompt order
    timings: bool = False  # extra: add the engine's timings of each row to the answer (benchmarks)


# ---- field checks -------------------------------------------------------------------------------------
def _type_name(v) -> str:
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                     list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"'{name}' must be an integer, got {_type_name(v)} {v!r}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad_request(f"'{name}' must be {rng}, got {v}", name)
    return v


def _num(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad_request(f"'{name}' must be a number, got {_type_name(v)} {v!r}", name)
    if v > hi or v < lo or (lo_open and v == lo):
        raise bad_request(f"'{name}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v}", name)
    return float(v)


def _bool(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad_request(f"'{name}' must be a boolean, got {_type_name(v)} {v!r}", name)
    return v


def _stop(body: dict) -> list[str] | None:
    v = body.get("stop")
    if v is None:
        return None
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"'stop' must be a string or a list of strings, got {_type_name(v)}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad_request("'stop' strings must not be empty", "stop")
    return stops or None


# ---- messages -------------------------------------------------------------------------------------------
def _image_url(part: dict, where: str) -> str:
    iu = part.get("image_url")
    url = iu.get("url") if isinstance(iu, dict) else iu
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}.image_url must be an object with a 'url' string", f"{where}.image_url")
    return url


def _video_ref(part: dict, where: str) -> ImageRef:
    """{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,...", "num_frames": N | "fps": F}}: a clip
    whose sampled frames (runtime/video.py: N evenly, default 4, or F per second) become the message's images."""
    vu = part.get("video_url")
    url = vu.get("url") if isinstance(vu, dict) else vu
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}.video_url must be an object with a 'url' string", f"{where}.video_url")
    opts = vu if isinstance(vu, dict) else {}
    return ImageRef(url, f"{where}.video_url", video={"frames": opts.get("num_frames"), "fps": opts.get("fps")})


def _message(i: int, m: Any, images: list[ImageRef], limits: Limits) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad_request(f"{where} must be an object with 'role' and 'content', got {_type_name(m)}", where)
    role = m.get("role")
    if not isinstance(role, str):
        raise bad_request(f"{where}.role must be a string, got {_type_name(role)}", f"{where}.role")
    if role not in ROLES:
        raise bad_request(f"{where}.role {role!r} is not supported (use one of: {', '.join(ROLES)})", f"{where}.role")
    for key in ("tool_calls", "function_call", "audio"):
        if m.get(key):
            raise bad_request(f"{where}.{key} is not supported by this server", f"{where}.{key}")
    content = m.get("content")
    texts: list[str] = []
    refs: list[ImageRef] = []
    if content is None:
        if role != "assistant":
            raise bad_request(f"{where}.content is missing", f"{where}.content")
    elif isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                t = part.get("text")
                if not isinstance(t, str):
                    raise bad_request(f"{pw}.text must be a string, got {_type_name(t)}", f"{pw}.text")
                texts.append(t)
            elif kind == "image_url":
                if role != "user":
                    raise bad_request(f"{pw}: images are accepted in user messages only", pw)
                refs.append(ImageRef(_image_url(part, pw), f"{pw}.image_url"))
            elif kind == "video_url":  # a clip: its sampled frames are images (resolved in app._prepare)
                if role != "user":
                    raise bad_request(f"{pw}: videos are accepted in user messages only", pw)
                refs.append(_video_ref(part, pw))
            else:
                raise bad_request(f"{pw} must be an object with type 'text', 'image_url' or 'video_url', got "
                                  f"{kind if isinstance(kind, str) else _type_name(part)!r}", f"{pw}.type")
    else:
        raise bad_request(f"{where}.content must be a string or a list of content parts, got {_type_name(content)}",
                          f"{where}.content")
    text = "\n".join(texts)
    for marker in ("<|image_", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"):
        if marker in text:
            raise bad_request(f"{where}.content must not contain the model's control text {marker!r} (send images "
                              "as image_url parts)", f"{where}.content")
    images.extend(refs)
    if len(images) > limits.max_images:
        raise bad_request(f"at most {limits.max_images} images per request, got more", f"{where}.content",
                          code="too_many_images")
    return {"role": ROLES[role], "content": text, "images": refs}


# ---- the request ----------------------------------------------------------------------------------------
def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """Validate a /v1/chat/completions body; raise APIError (400, or 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_type_name(body)}")
    model = body.get("model")
    if model is None:
        model = limits.model_name
    elif not isinstance(model, str):
        raise bad_request(f"'model' must be a string, got {_type_name(model)}", "model")
    elif model != limits.model_name:
        raise APIError(404, f"the model {model!r} does not exist (this server serves {limits.model_name!r})",
                       param="model", code="model_not_found")
    for name, fine in UNSUPPORTED_FIELDS.items():
        if body.get(name) not in fine:
            raise bad_request(f"'{name}' is not supported by this server (leave it out"
                              f"{' or set it to 0' if name.endswith('_penalty') else ''})", name,
                              code="unsupported_parameter")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad_request("'response_format' supports only {\"type\": \"text\"}", "response_format",
                          code="unsupported_parameter")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("'messages' must be a non-empty array of messages", "messages")
    images: list[ImageRef] = []
    messages = [_message(i, m, images, limits) for i, m in enumerate(msgs)]

    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    else:
        _int(body, "max_tokens", 1)  # still type-checked
    temperature = _num(body, "temperature", 0.0, 2.0)
    temperature = 1.0 if temperature is None else temperature
    top_p = _num(body, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", 0)
    rep = _num(body, "repetition_penalty", 0.0, 10.0, lo_open=True)
    seed = _int(body, "seed", 0)  # numpy's generators take non-negative seeds
    n = _int(body, "n", 1, limits.max_batch) or 1
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad_request(f"'stream_options' must be an object, got {_type_name(so)}", "stream_options")
    if so and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = _bool(so or {}, "include_usage")
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    num_crops = _int(body, "num_crops", 1, 16)
    ignore_eos = _bool(body, "ignore_eos")
    timings = _bool(body, "timings")
    kw: dict[str, Any] = dict(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature,
                              top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
                              repetition_penalty=1.0 if rep is None else rep, seed=seed, stop=_stop(body),
                              num_crops=num_crops, n=n, logprobs=(top or 0) if logprobs else None)
    if ignore_eos:  # only max_tokens and stop strings end the row
        kw["stop_ids"] = ()
    if not kw["do_sample"]:  # greedy: the sampling filters do not apply
        kw.update(temperature=1.0, top_k=0, top_p=1.0)
    return ChatRequest(model, messages, kw, stream, include_usage, logprobs, n, images, timings)


# ---- responses ------------------------------------------------------------------------------------------
def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def usage_of(results) -> dict:
    """Usage of one request's rows: the prompt (one shared prefill) counted once, every row's tokens."""
    first = results[0]
    return usage_body(first.prompt_tokens, sum(len(r.token_ids) for r in results), first.cached_tokens)


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's own text and bytes for logprobs ("▁" is a space; <0xNN> byte tokens are that byte)."""
    piece = tokenizer.id_to_token(int(token_id)) or ""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            b = bytes([int(piece[3:5], 16)])
            return b.decode("utf-8", errors="replace"), list(b)
        except ValueError:
            pass
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))


def logprobs_body(tokenizer, entries) -> dict:
    """TokenLogprob entries -> {"content": [{token, logprob, bytes, top_logprobs}]}."""
    out = []
    for e in entries or []:
        tok, b = token_text(tokenizer, e.token_id)
        top = []
        for tid, lp in e.top:
            t, tb = token_text(tokenizer, tid)
            top.append({"token": t, "logprob": float(lp), "bytes": tb})
        out.append({"token": tok, "logprob": float(e.logprob), "bytes": b, "top_logprobs": top})
    return {"content": out}


def completion_body(rid: str, model: str, created: int, results, tokenizer, logprobs: bool) -> dict:
    choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text},
                "logprobs": logprobs_body(tokenizer, r.logprobs) if logprobs else None,
                "finish_reason": r.finish_reason} for r in sorted(results, key=lambda r: r.index)]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage_of(results), "system_fingerprint": None}


def chunk_body(rid: str, model: str, created: int, choices: list[dict], usage: dict | None = None,
               include_usage: bool = False) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            "system_fingerprint": None}
    if include_usage:
        body["usage"] = usage
    return body


def chunk_choice(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def models_body(model: str, created: int | None = None) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created or int(time.time()),
                                        "owned_by": "phi3v-edge"}]}
