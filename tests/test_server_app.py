"""The server's readiness and draining states, in process (Starlette's TestClient) with a stand-in engine whose
warm-up waits for the test: /health and /v1/chat/completions answer 503 with Retry-After until the warm-up is
done, then 200; after shutdown begins, 503 "draining"."""
from __future__ import annotations

import threading
import time

from starlette.testclient import TestClient

from phi3v_edge.runtime.request import Delta, GenerationResult, RequestHandle
from phi3v_edge.runtime.server.app import ServerConfig, create_app


class SlowWarmEngine:
    """Answers every request with one token "ok"; warmup() blocks until `warm` is set."""
    max_batch, max_length, tokenizer = 2, 64, None

    def __init__(self):
        self.warm = threading.Event()
        self.shut = False

    def stats(self):
        return {"running": 0, "waiting": 0, "max_batch": 2, "free_slots": 2}

    def warmup(self):
        assert self.warm.wait(30)

    def shutdown(self, drain_timeout=30.0):
        self.shut = True

    def submit(self, prompt, images=None, **kw):
        h = RequestHandle("r1", 1)
        h._push(Delta(0, "ok", [7], None, "stop"))
        h._finish_row(0, GenerationResult([7], "ok", "stop", {"ttft": 0.0}, prompt_tokens=5))
        return h


BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_health_and_requests_wait_for_the_warm_up_then_drain():
    eng = SlowWarmEngine()
    app = create_app(eng, ServerConfig(model_name="m", retry_after=2))
    with TestClient(app) as client:
        h = client.get("/health")
        assert (h.status_code, h.json()["status"], h.headers["Retry-After"]) == (503, "loading", "2")
        r = client.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["Retry-After"] == "2"
        eng.warm.set()
        t0 = time.monotonic()
        while client.get("/health").status_code != 200:
            assert time.monotonic() - t0 < 10
            time.sleep(0.01)
        r = client.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
        assert r.json()["usage"]["prompt_tokens"] == 5
        app.state.server.draining = True  # what SIGTERM sets
        assert client.get("/health").json()["status"] == "draining"
        r = client.post("/v1/chat/completions", json=BODY)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert eng.shut  # the app's shutdown shut the engine down
