"""`phi3v-edge serve`: the real server as a subprocess on 127.0.0.1 (ephemeral port) with the demo model's INT4
bundle, driven by the official `openai` client and httpx.

Answers (greedy) and usage equal Phi3VRuntime's for the same prompts; every error class has its status and
OpenAI's error shape and the server answers the next good request; a client that goes away frees its slot;
the API key guards /v1/*; image URLs work only with --allow-image-urls; --request-timeout ends a request with a
clear error; a full queue answers 503 with Retry-After; SIGTERM lets an in-flight stream finish and exits 0; a
bounded load test (64 requests, 8 clients) gets every greedy answer equal to the sequential one.
"""
from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from phi3v_edge.models.demo import EXAMPLES, demo_bundle, load_questions
from phi3v_edge.runtime.chat_template import build_prompt
from phi3v_edge.runtime.server.launch import ServeProcess

KEY = "test-key-123"
MODEL = "demo-int4"
MAX_LENGTH = 4096
MAX_TOKENS = 16
LONG = 4000  # tokens of an ignore_eos reply to "hi": 10-30 s on 2 cores, far longer than any wait below
URL_LONG = 16000  # the same on url_server (--max-length 16384): >= 15 s even on an idle machine, past its 4 s timeout


# ---- the server process ---------------------------------------------------------------------------------
class Server(ServeProcess):
    """`phi3v-edge serve BUNDLE --port 0 ...` (runtime/server/launch.py) with the clients the tests use."""

    def __init__(self, bundle: Path, log_path: Path, *args: str):
        env = {k: v for k, v in os.environ.items() if k != "PHI3V_EDGE_API_KEY"}
        super().__init__(bundle, ["--provider", "cpu", "--served-model-name", MODEL, "--max-length",
                                  str(MAX_LENGTH), *args], log_path=log_path, env=env)

    def client(self, key: str | None = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0,
                             timeout=kw.pop("timeout", 60.0), **kw)

    def post(self, body, key: str | None = KEY, timeout: float = 60.0) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if isinstance(body, (bytes, str)):
            headers["Content-Type"] = "application/json"
            return httpx.post(self.url + "/v1/chat/completions", content=body, headers=headers, timeout=timeout)
        return httpx.post(self.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(f"{name}{labels} ") or (not labels and line.startswith(name + " ")):
                return float(line.split()[-1])
        return 0.0

    def wait_idle(self, timeout: float = 5.0) -> float:
        """Seconds until the engine has nothing running or waiting (fails after `timeout`)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.metric("phi3v_edge_requests_running") == 0 and self.metric("phi3v_edge_requests_waiting") == 0:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise AssertionError(f"the engine is still busy {timeout} s later: "
                             f"{httpx.get(self.url + '/health').text}")


def _start(bundle, tmp_path_factory, name, *args) -> Server:
    return Server(bundle, tmp_path_factory.mktemp(name) / "server.log", *args).start()  # stops itself on failure


@pytest.fixture(scope="module")
def bundle():
    return demo_bundle("cpu", log=lambda *a: None)


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    srv = _start(bundle, tmp_path_factory, "serve_main", "--api-key", KEY, "--max-batch", "4",
                 "--max-body-bytes", "1000000")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def url_server(bundle, tmp_path_factory):
    """Image URLs allowed; one slot and a queue of one (503 test); a short request timeout."""
    srv = _start(bundle, tmp_path_factory, "serve_urls", "--allow-image-urls", "--max-batch", "1",
                 "--max-queue", "1", "--request-timeout", "4", "--max-image-bytes", "100000",
                 "--max-length", "16384")
    yield srv
    srv.stop()


# ---- expected answers: the runtime itself ---------------------------------------------------------------
@pytest.fixture(scope="module")
def examples():
    return load_questions()


@pytest.fixture(scope="module")
def runtime(bundle):
    from phi3v_edge.runtime import Phi3VRuntime

    return Phi3VRuntime(bundle, provider="cpu", max_length=MAX_LENGTH)


def runtime_answer(rt, question: str, images: list) -> dict:
    prompt, images = build_prompt([{"role": "user", "content": question, "images": images}])
    r = rt.generate(prompt, images, max_new_tokens=MAX_TOKENS)
    return {"text": r.text, "finish": r.finish_reason, "ids": list(r.token_ids), "prompt_tokens": r.prompt_tokens}


@pytest.fixture(scope="module")
def reference(runtime, examples):
    """Phi3VRuntime's greedy answer (text, finish, token ids, prompt tokens) to each example question."""
    return [runtime_answer(runtime, q["question"], q["images"]) for q in examples]


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_message(question: str, urls: list[str]) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


def example_messages(q) -> list[dict]:
    return image_message(q["question"], [data_url(p) for p in q["images"]])


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_serving(srv: Server) -> None:
    r = srv.post(GOOD)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# ---- answers --------------------------------------------------------------------------------------------
def test_answers_and_usage_equal_the_runtime(server, examples, reference):
    c = server.client()
    for q, ref in zip(examples, reference):
        r = c.chat.completions.create(model=MODEL, messages=example_messages(q), max_tokens=MAX_TOKENS,
                                      temperature=0)
        assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
        ch = r.choices[0]
        assert (ch.message.role, ch.message.content, ch.finish_reason) == ("assistant", ref["text"], ref["finish"])
        assert r.usage.prompt_tokens == ref["prompt_tokens"]
        assert r.usage.completion_tokens == len(ref["ids"])
        assert r.usage.total_tokens == ref["prompt_tokens"] + len(ref["ids"])
        assert r.usage.prompt_tokens_details.cached_tokens <= ref["prompt_tokens"]
    # the demo model answers most of its examples right through the server too (floor as in test_demo_command)
    assert sum(ref["text"].strip() == q["answer"] for q, ref in zip(examples, reference)) >= 7


def test_streaming_equals_the_runtime(server, examples, reference):
    c = server.client()
    for q, ref in zip(examples, reference):
        chunks = list(c.chat.completions.create(model=MODEL, messages=example_messages(q), max_tokens=MAX_TOKENS,
                                                temperature=0, stream=True, stream_options={"include_usage": True}))
        assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert text == ref["text"] and finishes == [ref["finish"]]
        last = chunks[-1]  # include_usage: a last chunk with no choices and the usage
        assert last.choices == [] and last.usage.prompt_tokens == ref["prompt_tokens"]
        assert last.usage.completion_tokens == len(ref["ids"])
        assert all(ch.usage is None for ch in chunks[:-1])
    # the raw stream: server-sent events ending with [DONE]
    body = {"model": MODEL, "messages": example_messages(examples[0]), "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "")
                   for e in events[:-1]) == reference[0]["text"]


def test_jpeg_webp_gif_and_prefix_cache(server, runtime, examples):
    import io

    from PIL import Image

    q = examples[3]
    c = server.client()
    for fmt, mime in (("JPEG", "jpeg"), ("WEBP", "webp"), ("GIF", "gif")):
        buf = io.BytesIO()
        Image.open(q["images"][0]).convert("RGB").save(buf, fmt)
        url = f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()
        r = c.chat.completions.create(model=MODEL, messages=image_message(q["question"], [url]),
                                      max_tokens=MAX_TOKENS, temperature=0)
        ref = runtime_answer(runtime, q["question"], [buf.getvalue()])
        assert (r.choices[0].message.content, r.usage.prompt_tokens) == (ref["text"], ref["prompt_tokens"]), fmt
    # the same request again: its prompt's KV is still in a free slot, so the usage reports cached tokens
    r = c.chat.completions.create(model=MODEL, messages=image_message(q["question"], [url]), max_tokens=MAX_TOKENS,
                                  temperature=0)
    assert 0 < r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens
    assert r.choices[0].message.content == ref["text"]


def test_n_rows_and_logprobs(server, examples, reference):
    c = server.client()
    q, ref = examples[1], reference[1]
    r = c.chat.completions.create(model=MODEL, messages=example_messages(q), max_tokens=MAX_TOKENS, temperature=0,
                                  n=2, logprobs=True, top_logprobs=2)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert all(ch.message.content == ref["text"] for ch in r.choices)
    assert r.usage.prompt_tokens == ref["prompt_tokens"]  # one shared prefill: counted once
    assert r.usage.completion_tokens == 2 * len(ref["ids"])
    for ch in r.choices:
        lp = ch.logprobs.content
        assert len(lp) == len(ref["ids"])
        for entry in lp:  # greedy: the chosen token is the most likely one
            assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
            assert entry.top_logprobs[0].token == entry.token
            assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
            assert entry.top_logprobs[1].logprob <= entry.top_logprobs[0].logprob


def test_stop_string_and_max_tokens(server, examples, reference):
    c = server.client()
    q, ref = examples[0], reference[0]
    assert len(ref["text"]) >= 2
    r = c.chat.completions.create(model=MODEL, messages=example_messages(q), max_tokens=MAX_TOKENS, temperature=0,
                                  stop=[ref["text"][1:]])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (ref["text"][:1], "stop")
    r = c.chat.completions.create(model=MODEL, messages=example_messages(q), max_completion_tokens=1, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 1


# ---- models, health, key --------------------------------------------------------------------------------
def test_models_health_and_api_key(server):
    h = httpx.get(server.url + "/health", timeout=10)  # open without a key
    assert h.status_code == 200 and h.json()["status"] == "ready" and h.json()["max_batch"] == 4
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 200
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    for key in (None, "wrong-key"):
        assert_error(server.post(GOOD, key=key), 401, "invalid_api_key")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert_error(httpx.get(server.url + "/v1/models", headers=headers, timeout=10), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong-key").chat.completions.create(**GOOD)
    assert_serving(server)


# ---- errors ---------------------------------------------------------------------------------------------
def _png_prefix_junk() -> str:  # a PNG signature, then garbage: passes the signature check, fails decoding
    return "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()


def _msgs(content) -> list[dict]:
    return [{"role": "user", "content": content}]


BAD_REQUESTS = {
    "not_json": (b"{not json", 400, "invalid_json", None),
    "not_an_object": ([1, 2], 400, None, None),
    "no_messages": ({"model": MODEL}, 400, None, "messages"),
    "unknown_role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400, None, "messages[0].role"),
    "content_wrong_type": ({"messages": _msgs(42)}, 400, None, "messages[0].content"),
    "part_wrong_type": ({"messages": _msgs([{"type": "input_audio"}])}, 400, None, "messages[0].content[0].type"),
    "max_tokens_string": ({"messages": _msgs("hi"), "max_tokens": "10"}, 400, None, "max_tokens"),
    "temperature_range": ({"messages": _msgs("hi"), "temperature": 3}, 400, None, "temperature"),
    "negative_seed": ({"messages": _msgs("hi"), "temperature": 1, "seed": -1}, 400, None, "seed"),
    "too_deep": (b"[" * 50_000 + b"]" * 50_000, 400, "invalid_json", None),
    "lone_surrogate": (b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', 400, None, None),
    "stream_not_bool": ({"messages": _msgs("hi"), "stream": "yes"}, 400, None, "stream"),
    "n_over_max_batch": ({"messages": _msgs("hi"), "n": 5}, 400, None, "n"),
    "top_logprobs_over_5": ({"messages": _msgs("hi"), "logprobs": True, "top_logprobs": 6}, 400, None,
                            "top_logprobs"),
    "frequency_penalty": ({"messages": _msgs("hi"), "frequency_penalty": 0.5}, 400, "unsupported_parameter",
                          "frequency_penalty"),
    "tools": ({"messages": _msgs("hi"), "tools": [{"type": "function"}]}, 400, "unsupported_parameter", "tools"),
    "bad_base64": ({"messages": _msgs([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}])},
                   400, "invalid_image_url", None),
    "not_an_image": ({"messages": _msgs([{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"hello world").decode()}}])}, 400, "invalid_image", None),
    "unreadable_png": ({"messages": _msgs([{"type": "image_url", "image_url": {"url": _png_prefix_junk()}},
                                           {"type": "text", "text": "What?"}])}, 400, None, None),
    "local_path": ({"messages": _msgs([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}])}, 400,
                   "invalid_image_url", None),
    "file_url": ({"messages": _msgs([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}])}, 400,
                 "invalid_image_url", None),
    "url_not_allowed": ({"messages": _msgs([{"type": "image_url", "image_url": {
        "url": "http://127.0.0.1:9/x.png"}}])}, 400, "image_urls_disabled", None),
    "over_max_length": ({"messages": _msgs("hi"), "max_tokens": 5000}, 400, "context_length_exceeded", None),
    "unknown_model": ({"model": "gpt-4o", "messages": _msgs("hi")}, 404, "model_not_found", "model"),
    "body_too_large": ({"messages": _msgs("x" * 1_200_000)}, 413, "request_too_large", None),
}


def test_every_error_class_then_a_good_request(server):
    for name, (body, status, code, param) in BAD_REQUESTS.items():
        if isinstance(body, dict):
            body = {"model": MODEL, **body}
        err = assert_error(server.post(body), status, code, param)
        if name == "over_max_length":  # says the numbers
            assert "5000" in err["message"] and str(MAX_LENGTH) in err["message"], err
        assert_serving(server)  # the server keeps serving after each one
    r = httpx.get(server.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert_error(r, 404)
    assert server.metric("phi3v_edge_request_errors_total", '{status="500"}') == 0


def test_openai_client_raises_typed_errors(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=_msgs("hi"), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_length"):
        c.chat.completions.create(model=MODEL, messages=_msgs("hi"), max_tokens=5000)
    assert_serving(server)


# ---- cancellation ---------------------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_the_slot(server):
    c = server.client()
    stream = c.chat.completions.create(model=MODEL, messages=_msgs("hi"), max_tokens=LONG, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    got = 0
    for ch in stream:
        got += bool(ch.choices and ch.choices[0].delta.content)
        if got >= 3:
            break
    assert got == 3
    assert server.metric("phi3v_edge_requests_running") == 1
    stream.close()  # the client goes away with thousands of tokens still to generate
    server.wait_idle(timeout=5.0)
    # non-streaming: a client that times out and hangs up cancels its request too
    with pytest.raises(httpx.ReadTimeout):
        server.post({"model": MODEL, "messages": _msgs("hi"), "max_tokens": LONG, "temperature": 0,
                     "ignore_eos": True}, timeout=1.0)
    server.wait_idle(timeout=5.0)
    assert_serving(server)


# ---- image URLs, timeout, full queue --------------------------------------------------------------------
class _Images(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **kw):
        super().__init__(*a, directory=str(EXAMPLES), **kw)

    def do_GET(self):
        if self.path.startswith("/elsewhere/"):  # a redirect to another host name (same machine)
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/{self.path.split('/')[-1]}")
            self.end_headers()
        elif self.path.startswith("/same/"):  # a redirect on the same host
            self.send_response(302)
            self.send_header("Location", "/" + self.path.split("/")[-1])
            self.end_headers()
        elif self.path == "/big.png":
            data = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200_000
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            super().do_GET()

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()
    t.join(5)


def test_image_urls_only_when_allowed(server, url_server, image_host, examples, reference):
    q, ref = examples[0], reference[0]
    name = Path(q["images"][0]).name
    body = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0,
            "messages": image_message(q["question"], [f"{image_host}/{name}"])}
    assert_error(server.post(body), 400, "image_urls_disabled")  # the main server has no --allow-image-urls
    for path in (name, f"same/{name}"):
        body["messages"] = image_message(q["question"], [f"{image_host}/{path}"])
        r = url_server.post(body, key=None)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == ref["text"]
        assert r.json()["usage"]["prompt_tokens"] == ref["prompt_tokens"]
    for path, code in ((f"elsewhere/{name}", "image_fetch_failed"), ("missing.png", "image_fetch_failed"),
                       ("big.png", "image_too_large")):
        body["messages"] = image_message(q["question"], [f"{image_host}/{path}"])
        err = assert_error(url_server.post(body, key=None), 400, code)
        if path.startswith("elsewhere"):
            assert "another host" in err["message"]
    assert_serving(url_server)


def test_request_timeout(url_server):
    """A stream that runs past --request-timeout (4 s) ends with an error event; a request that waited behind it
    in the queue (one slot) gets a 504."""
    body = {"model": MODEL, "messages": _msgs("hi"), "max_tokens": URL_LONG, "temperature": 0}
    c = url_server.client(key=None)
    stream = iter(c.chat.completions.create(**body, stream=True, extra_body={"ignore_eos": True}))
    chunks = [next(stream)]
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(url_server.post, {**body, "ignore_eos": True}, None)
        with pytest.raises(openai.APIError, match="request-timeout"):
            for ch in stream:
                chunks.append(ch)
        assert len(chunks) > 2  # the error event came after the stream had started
        assert_error(queued.result(30), 504, "request_timeout")
    url_server.wait_idle()
    assert_serving(url_server)


def test_full_queue_answers_503_with_retry_after(url_server):
    """One slot, a queue of one: a running request and a waiting one, then the next gets 503."""
    c = url_server.client(key=None)
    long_body = {"model": MODEL, "messages": _msgs("hi"), "max_tokens": URL_LONG, "temperature": 0, "ignore_eos": True}
    running = c.chat.completions.create(**{k: v for k, v in long_body.items() if k != "ignore_eos"}, stream=True,
                                        extra_body={"ignore_eos": True})
    next(iter(running))
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(url_server.post, long_body, None)
        t0 = time.monotonic()
        while url_server.metric("phi3v_edge_requests_waiting") < 1:
            assert time.monotonic() - t0 < 5, "the second request never queued"
            time.sleep(0.02)
        r = url_server.post(GOOD, key=None)
        assert_error(r, 503, "server_overloaded")
        assert int(r.headers["Retry-After"]) >= 1
        running.close()  # frees the slot: the waiting one runs (and ends by --request-timeout)
        assert waiting.result(30).status_code in (200, 504)
    url_server.wait_idle()
    assert_serving(url_server)


# ---- load -----------------------------------------------------------------------------------------------
COUNTERS = ("phi3v_edge_prompt_tokens_total", "phi3v_edge_generation_tokens_total",
            "phi3v_edge_time_to_first_token_seconds_count", "phi3v_edge_e2e_request_latency_seconds_count",
            "phi3v_edge_engine_time_to_first_token_seconds_count")


def test_load_64_requests_8_clients(server, examples, reference):
    """8 clients, 64 requests (half streamed): every greedy answer equals the sequential one, nothing lost, the
    metrics count them all, and the server is healthy and idle after."""
    c = server.client()

    def finished() -> float:
        return sum(server.metric("phi3v_edge_request_success_total", f'{{finish_reason="{r}"}}')
                   for r in ("stop", "length"))

    before, counts = finished(), {name: server.metric(name) for name in COUNTERS}

    def one(i: int):
        q = examples[i % len(examples)]
        kw = dict(model=MODEL, messages=example_messages(q), max_tokens=MAX_TOKENS, temperature=0)
        if i % 2:
            chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
            return i, "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices), chunks[-1].usage
        r = c.chat.completions.create(**kw)
        return i, r.choices[0].message.content, r.usage

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(one, range(64)))
    answers = {i: a for i, a, _ in out}
    assert len(answers) == 64
    wrong = {i: a for i, a in answers.items() if a != reference[i % len(examples)]["text"]}
    assert not wrong
    assert finished() - before == 64
    grew = {name: server.metric(name) - counts[name] for name in COUNTERS}
    assert grew["phi3v_edge_prompt_tokens_total"] == sum(u.prompt_tokens for _, _, u in out)
    assert grew["phi3v_edge_generation_tokens_total"] == sum(u.completion_tokens for _, _, u in out)
    assert all(grew[name] == 64 for name in COUNTERS[2:])
    server.wait_idle()
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ready"
    assert_serving(server)


# ---- SIGTERM --------------------------------------------------------------------------------------------
def test_sigterm_drains_in_flight_requests_then_exits_0(bundle, tmp_path):
    srv = Server(bundle, tmp_path / "server.log", "--drain-timeout", "30")
    try:
        srv.start()
        c = srv.client(key=None)
        n = 200
        stream = c.chat.completions.create(model=MODEL, messages=_msgs("hi"), max_tokens=n, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        it = iter(stream)
        next(it)
        srv.proc.send_signal(signal.SIGTERM)
        rest = list(it)  # the in-flight request runs to its end
        assert rest[-1].usage.completion_tokens == n
        assert [ch.choices[0].finish_reason for ch in rest if ch.choices and ch.choices[0].finish_reason] == \
            ["length"]
        assert srv.proc.wait(30) == 0
        with pytest.raises(httpx.TransportError):  # no longer admitting
            httpx.get(srv.url + "/health", timeout=2)
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()


# ---- the command without a server -----------------------------------------------------------------------
def test_serve_command_errors_and_help(tmp_path):
    run = [sys.executable, "-m", "phi3v_edge.runtime.cli", "serve"]
    r = subprocess.run(run + ["--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for opt in ("--host", "--port", "--provider", "--max-batch", "--max-length", "--api-key", "--served-model-name",
                "--max-queue", "--request-timeout", "--allow-image-urls", "--max-image-bytes",
                "--max-images-per-request"):
        assert opt in r.stdout
    r = subprocess.run(run + [str(tmp_path / "no-bundle"), "--port", "0"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "no such directory" in r.stderr and "Traceback" not in r.stderr


def test_serve_without_the_extra_says_what_to_install(monkeypatch, capsys, tmp_path):
    import importlib.util

    from phi3v_edge.runtime.server import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert cli.main([str(tmp_path)]) == 2
    assert "pip install 'phi3v-edge[serve]'" in capsys.readouterr().err


def test_runtime_stays_free_of_the_server_stack():
    code = ("import sys, phi3v_edge.runtime, phi3v_edge.runtime.cli, phi3v_edge.runtime.server.protocol, "
            "phi3v_edge.runtime.server.images, phi3v_edge.runtime.server.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'starlette', 'uvicorn', 'prometheus_client', "
            "'fastapi') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
