"""Ray Serve scale-out (runtime/server/ray_app.py, ray_cli.py, ray_proxy.py): a private local Ray node on this CPU
machine (ray_cli.LocalRayHead: loopback only, token auth, its own process group and temp dir), two replicas of
the demo model's INT4 bundle behind Ray Serve's HTTP proxy on 127.0.0.1 (an ephemeral port), driven by the
official `openai` client.

    python -m pytest -q tests/test_ray_serve.py        # the one command (about 2-4 minutes on 2 busy cores)

- concurrent requests, streaming and not, answer exactly what Phi3VRuntime answers greedily, and both replicas
  served (the x-phi3v-replica header);
- a replica killed mid-run (ray.kill of its actor): its in-flight requests end with a clean error (503
  replica_failed, or an error event then [DONE] on a started stream), the requests on the other replica finish,
  the endpoint keeps answering, and Ray starts a replacement that serves;
- the fixture stops every Ray process it started and checks that none is left.
Plain-Python parts (options, argument conversion, the proxy middleware) are tested without Ray.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from phi3v_edge.runtime.server import ray_cli
from phi3v_edge.runtime.server.ray_cli import (
    REPLICA_HEADER,
    RayServeError,
    Scale,
    deployment_options,
)

# before anything imports ray: Ray reads this once, at import (keep 127.0.0.1, never the machine's address)
os.environ.update(ray_cli.LOOPBACK_ENV)
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="Ray Serve is not installed: pip install 'phi3v-edge[ray]'")
MODEL = "demo-int4"
MAX_LENGTH = 8192
MAX_TOKENS = 16
MAX_BATCH = 2  # per replica: 2 replicas x 2 slots, so 4 concurrent requests fill both
# tokens of an ignore_eos reply (fits MAX_LENGTH): long enough to be killed mid-run. The demo model decodes
# ~1900 tokens/s alone on a 2-vCPU EPYC, so 1500 tokens could end before the kill; 7000 take >= 5 s there
LONG = 7000


# ---- plain Python: no Ray needed --------------------------------------------------------------------------
def test_deployment_options():
    fixed = deployment_options(Scale(replicas=3, gpus_per_replica=1), max_batch=8)
    assert fixed == {"num_replicas": 3, "max_ongoing_requests": 8, "ray_actor_options": {"num_cpus": 1.0,
                                                                                         "num_gpus": 1}}
    auto = deployment_options(Scale(replicas=None, autoscale=(0, 4)), max_batch=4)
    assert "num_replicas" not in auto and auto["autoscaling_config"] == {
        "min_replicas": 0, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 4}
    assert deployment_options(Scale(max_ongoing_requests=3), 8)["max_ongoing_requests"] == 3
    assert ray_cli.parse_autoscale("2:6") == (2, 6)
    for bad in ("4", "3:1", "a:b", "0:0", "-1:2"):
        with pytest.raises(RayServeError, match="autoscale"):
            ray_cli.parse_autoscale(bad)
    with pytest.raises(RayServeError, match="replicas"):
        deployment_options(Scale(replicas=0), 4)


@needs_ray
def test_app_args_from_strings():
    from phi3v_edge.runtime.server.ray_app import AppArgs

    a = AppArgs.from_dict({"bundle": "/b/x", "replicas": "2", "gpus_per_replica": "0.5", "cuda_graph": "false",
                           "threads": "none", "served_model_name": "m", "allow_image_urls": "true"})
    assert (a.replicas, a.gpus_per_replica, a.cuda_graph, a.threads, a.allow_image_urls) == (2, 0.5, False, None,
                                                                                           True)
    assert a.engine_kwargs()["threads"] is None  # GPU share: the engine's own default
    assert AppArgs.from_dict({"bundle": "/b/x"}).engine_kwargs()["threads"] == 1  # CPU: cpus_per_replica
    assert a.server_kwargs()["model_name"] == "m" and AppArgs.from_dict({"bundle": "/b/x/"}).server_kwargs()[
        "model_name"] == "x"
    with pytest.raises(RayServeError, match="unknown application argument"):
        AppArgs.from_dict({"bundle": "/b", "replica": 2})
    with pytest.raises(RayServeError, match="replicas: 'two' is not a int"):
        AppArgs.from_dict({"bundle": "/b", "replicas": "two"})
    with pytest.raises(RayServeError, match="bundle=PATH"):
        AppArgs.from_dict({"replicas": 2})


@needs_ray
def test_readme_serve_config_is_valid():
    """The README's Serve config file passes Ray's own schema and our argument checks."""
    from pathlib import Path

    import yaml
    from phi3v_edge.runtime.server.ray_app import AppArgs, build
    from ray.serve.schema import ServeDeploySchema

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n(# serve.yaml.*?)```", readme, re.DOTALL)
    assert block, "the README has no serve.yaml example"
    cfg = ServeDeploySchema.model_validate(yaml.safe_load(block.group(1)))
    (app,) = cfg.applications
    assert app.import_path == "phi3v_edge.runtime.server.ray_app:build"
    args = AppArgs.from_dict(app.args)
    assert args.scale().autoscale == (2, 8) and args.gpus_per_replica == 1
    with pytest.raises(RayServeError, match="no such directory"):  # the builder checks the bundle path
        build(app.args)


def test_cli_rejects_ray_options_without_ray(tmp_path, capsys):
    from phi3v_edge.runtime.server.cli import main

    assert main([str(tmp_path), "--replicas", "2"]) == 2
    assert "--replicas needs --ray" in capsys.readouterr().err
    assert main([str(tmp_path), "--ray", "--replicas", "2", "--autoscale", "1:2"]) == 2
    assert "not both" in capsys.readouterr().err


@needs_ray
def test_cli_bad_ray_options_fail_before_ray_starts(bundle, capsys):
    from phi3v_edge.runtime.server.cli import main

    free = ray_cli.free_ports(1)[0]  # nothing listens there
    for args, message in ((["--replicas", "0"], "--replicas must be >= 1"),
                          (["--autoscale", "3:1"], "need 0 <= MIN <= MAX"),
                          (["--max-ongoing-requests", "0"], "max_ongoing_requests must be >= 1"),
                          (["--address", f"127.0.0.1:{free}"], f"no Ray cluster answers at 127.0.0.1:{free}"),
                          (["--address", "nonsense"], "HOST:PORT")):
        t0 = time.monotonic()
        assert main([str(bundle), "--ray", *args]) == 2
        assert message in capsys.readouterr().err and time.monotonic() - t0 < 30


def _run_asgi(app, path: str) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "path": path, "method": "POST", "headers": []}, receive, send))
    return sent


def test_proxy_middleware_turns_a_dead_replica_into_clean_errors():
    from phi3v_edge.runtime.server.ray_proxy import ReplicaFailure

    async def nothing(scope, receive, send):  # what Ray's proxy does when the replica died before answering
        return None

    async def cut_stream(scope, receive, send):  # ... and once our replica's stream had started
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (REPLICA_HEADER.encode(), b"r1")]})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})

    async def whole(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})

    sent = _run_asgi(ReplicaFailure(nothing), "/v1/chat/completions")
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "replica_failed"
    sent = _run_asgi(ReplicaFailure(cut_stream), "/v1/chat/completions")
    events = sent[-1]["body"].decode().split("\n\n")
    assert sent[-1]["more_body"] is False and events[1] == "data: [DONE]"
    assert json.loads(events[0][6:])["error"]["code"] == "replica_failed"
    assert len(_run_asgi(ReplicaFailure(whole), "/v1/chat/completions")) == 2  # untouched
    assert _run_asgi(ReplicaFailure(nothing), "/other/app") == []  # other routes and apps: untouched


# ---- the cluster ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle():
    from phi3v_edge.models.demo import demo_bundle

    return demo_bundle("cpu", log=lambda *a: None)


@pytest.fixture(scope="module")
def cluster(bundle, tmp_path_factory):
    """A private Ray node + Serve on 127.0.0.1 with 2 replicas; yields (url, head). Stops everything after."""
    t0 = time.monotonic()
    head = ray_cli.LocalRayHead(num_cpus=4, log_path=tmp_path_factory.mktemp("ray") / "head.log",
                                object_store_memory=256 * 1024 * 1024).start(timeout=240)
    t_head = time.monotonic() - t0
    try:
        import ray
        from phi3v_edge.runtime.server.ray_app import build
        from ray import serve

        ray.init(address=head.address, include_dashboard=False, log_to_driver=False)
        port = ray_cli.free_ports(1)[0]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # the application builder as `serve run ...ray_app:build key=value` calls it: every value a string
        app = build({"bundle": str(bundle), "replicas": "2", "provider": "cpu", "max_batch": str(MAX_BATCH),
                     "max_length": str(MAX_LENGTH), "served_model_name": MODEL, "cpus_per_replica": "1"})
        serve.run(app, name=ray_cli.APP_NAME, route_prefix="/")
        print(f"ray head up in {t_head:.1f} s; 2 replicas serving {time.monotonic() - t0:.1f} s after the start")
        yield f"http://127.0.0.1:{port}", head
    finally:
        t0 = time.monotonic()
        try:
            if "ray" in sys.modules:
                import ray
                from ray import serve

                if ray.is_initialized():
                    serve.shutdown()
                    ray.shutdown()
        finally:
            head.stop()
        left = head.pids()
        print(f"ray teardown: {time.monotonic() - t0:.1f} s, processes left: {left}")
        assert left == [], f"Ray processes left behind: {left}"


def client(url: str, timeout: float = 120.0):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)


def messages_of(q) -> list[dict]:
    import base64
    from pathlib import Path

    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
        Path(p).read_bytes()).decode()}} for p in q["images"]]
    return [{"role": "user", "content": parts + [{"type": "text", "text": q["question"]}]}]


@pytest.fixture(scope="module")
def examples_and_reference(bundle):
    """The first 4 example questions and Phi3VRuntime's greedy answers to them (single process, no Ray)."""
    from phi3v_edge.models.demo import load_questions
    from phi3v_edge.runtime import Phi3VRuntime
    from phi3v_edge.runtime.chat_template import build_prompt

    qs = load_questions()[:4]
    rt = Phi3VRuntime(bundle, provider="cpu", max_length=MAX_LENGTH)
    ref = []
    for q in qs:
        prompt, images = build_prompt([{"role": "user", "content": q["question"], "images": q["images"]}])
        r = rt.generate(prompt, images, max_new_tokens=MAX_TOKENS)
        ref.append((r.text, r.finish_reason))
    return qs, ref


def ask(url: str, q, stream: bool) -> tuple[str, str, str]:
    """(text, finish_reason, replica) of one greedy request through the proxy."""
    c = client(url)
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=messages_of(q), max_tokens=MAX_TOKENS,
                                                      temperature=0, stream=stream)
    replica = raw.headers.get(REPLICA_HEADER, "")
    if not stream:
        r = raw.parse()
        return r.choices[0].message.content, r.choices[0].finish_reason, replica
    chunks = list(raw.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    return text, finish[0] if len(finish) == 1 else repr(finish), replica


@needs_ray
@pytest.mark.slow
def test_replicas_answer_like_the_runtime(cluster, examples_and_reference):
    url, _ = cluster
    qs, ref = examples_and_reference
    jobs = [(i, stream) for _ in range(2) for i in range(len(qs)) for stream in (False, True)]  # 16 requests
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda j: ask(url, qs[j[0]], j[1]), jobs))
    for (i, stream), (text, finish, _) in zip(jobs, got):
        assert (text, finish) == ref[i], f"question {i} stream={stream}"
    replicas = {r for _, _, r in got}
    assert len(replicas) == 2 and "" not in replicas, replicas  # both replicas served
    # the server's other routes through the proxy: the model list, and a bad request is OpenAI's 400
    assert [m.id for m in client(url).models.list().data] == [MODEL]
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def _long_request(url: str, stream: bool, started: dict, key: int) -> dict:
    """One ignore_eos request of LONG tokens; records its replica as soon as its headers arrive."""
    import openai

    c = client(url, timeout=300)
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Count please ({key})"}],
            "max_tokens": LONG, "temperature": 0, "extra_body": {"ignore_eos": True}}
    try:
        if stream:
            raw = c.chat.completions.with_raw_response.create(stream=True, **body)
            started[key] = raw.headers.get(REPLICA_HEADER)
            chunks = list(raw.parse())
            finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            return {"ok": True, "finish": finish, "replica": started[key]}
        raw = c.chat.completions.with_raw_response.create(**body)
        r = raw.parse()
        return {"ok": True, "finish": [r.choices[0].finish_reason], "replica": raw.headers.get(REPLICA_HEADER)}
    except openai.APIStatusError as e:
        return {"ok": False, "status": e.status_code, "body": e.body, "stream": stream}
    except openai.APIError as e:  # an error event inside a started stream
        return {"ok": False, "status": None, "body": e.body, "stream": stream, "replica": started.get(key)}


@needs_ray
@pytest.mark.slow
def test_killed_replica_fails_cleanly_and_is_replaced(cluster, examples_and_reference):
    import ray
    from phi3v_edge.runtime.server.ray_app import DEPLOYMENT_NAME
    from ray import serve

    url, _ = cluster
    qs, ref = examples_and_reference
    started: dict = {}
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(_long_request, url, k % 2 == 0, started, k) for k in range(4)]  # fills both replicas
        deadline = time.monotonic() + 120
        while not started and time.monotonic() < deadline and not any(f.done() for f in futs):
            time.sleep(0.1)
        assert started, f"no stream started within 120 s: {[f.result() for f in futs if f.done()]}"
        time.sleep(0.3)  # a few tokens in
        victim = next(iter(started.values()))
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{ray_cli.APP_NAME}#{DEPLOYMENT_NAME}#{victim}", namespace="serve"),
                 no_restart=True)
        t_kill = time.monotonic()
        # the endpoint keeps answering through the other replica while the long requests are still running
        text, finish, replica = ask(url, qs[0], stream=False)
        assert (text, finish) == ref[0] and replica != victim
        results = [f.result(timeout=400) for f in futs]
    failed = [r for r in results if not r["ok"]]
    print("long requests after the kill:", [{k: v for k, v in r.items() if k != "body"} for r in results])
    assert failed, results  # the victim had at least the stream that named it
    for r in failed:  # clean errors, in OpenAI's shape: 503 before the answer started, an error event after
        assert r["body"]["code"] == "replica_failed" and r["body"]["type"] == "server_error", r
        assert r["status"] in (503, None) and (r["status"] == 503 or r["stream"]), r
    for r in results:
        if r["ok"]:  # the requests on the surviving replica ran to their end
            assert r["finish"] == ["length"] and r["replica"] != victim, r
    # Ray replaces the dead replica; the replacement serves
    seen, deadline = set(), time.monotonic() + 300
    while time.monotonic() < deadline:
        st = serve.status().applications[ray_cli.APP_NAME].deployments[DEPLOYMENT_NAME]
        if st.replica_states.get("RUNNING", 0) == 2:
            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(lambda i: ask(url, qs[i % len(qs)], i % 2 == 1), range(8)))
            assert all((t, f) == ref[i % len(qs)] for i, (t, f, _) in enumerate(got))
            seen |= {r for _, _, r in got}
            if seen - {victim, replica}:
                break
        time.sleep(2.0)
    assert seen - {victim, replica}, f"no replacement replica served within 300 s (seen {seen})"
    assert victim not in seen
    print(f"replica {victim} killed; replacement serving {time.monotonic() - t_kill:.0f} s later")


def test_runtime_and_serve_cli_import_no_ray():
    code = ("import sys; import phi3v_edge.runtime; from phi3v_edge.runtime.server.cli import build_parser; "
            "build_parser(); import phi3v_edge.runtime.server.ray_proxy; assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_ray
@pytest.mark.slow
def test_cli_serve_ray_answers_and_stops_cleanly(bundle, examples_and_reference, tmp_path):
    """`phi3v-edge serve BUNDLE --ray` (its own private Ray): answers like the runtime; SIGTERM exits 0 and
    leaves no Ray process and no temp dir behind."""
    qs, ref = examples_and_reference
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PHI3V_EDGE_API_KEY"}
    log = (tmp_path / "serve.log").open("w")  # closed in the finally below
    proc = subprocess.Popen([sys.executable, "-m", "phi3v_edge.runtime.cli", "serve", str(bundle), "--ray",
                             "--replicas", "1", "--port", "0", "--provider", "cpu", "--max-length", "1024",
                             "--served-model-name", MODEL, "--ray-num-cpus", "2"],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        line = proc.stdout.readline()  # blocks until the endpoint is up (or the command failed)
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+) .*private Ray in (\S+)\)", line)
        assert m, f"{line!r}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        url, temp_dir = m.groups()
        group = _head_group(proc.pid)  # the private Ray's process group (led by ray_cli's reaper)
        text, finish, replica = ask(url, qs[0], stream=True)
        assert (text, finish) == ref[0] and replica
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
    assert not os.path.exists(temp_dir)
    left = _group_members(group)
    assert left == [], f"processes of the private Ray still running: {left}"


def _group_members(group: int) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.getpgid(int(p)) == group:
                    out.append(int(p))
            except OSError:
                pass
    return out


def _head_group(cli_pid: int) -> int:
    """The process group of the CLI's private Ray: its child started with ray_cli.REAP_FLAG leads it."""
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == cli_pid and ray_cli.REAP_FLAG.encode() in cmdline:
            assert os.getpgid(int(p)) == int(p)
            return int(p)
    raise AssertionError("the CLI's private Ray process group was not found")
