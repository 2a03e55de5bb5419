"""`phi3v-edge serve BUNDLE`: the OpenAI-compatible HTTP server (needs the extra: pip install 'phi3v-edge[serve]').

Binds 127.0.0.1 unless told otherwise, prints `phi3v-edge serve: listening on http://HOST:PORT` once the port is
bound (--port 0 picks a free one), loads the bundle into one batching Engine, warms it up (/health answers 503
until then), and serves until SIGTERM / Ctrl-C: then it stops accepting connections, lets in-flight requests
finish for up to --drain-timeout seconds, cancels the rest, and exits 0.
"""
from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging
import os
import signal
import socket
import sys
from pathlib import Path

EXTRA_MODULES = ("starlette", "uvicorn", "prometheus_client")
INSTALL_HINT = "pip install 'phi3v-edge[serve]'"
API_KEY_ENV = "PHI3V_EDGE_API_KEY"
MIB = 1024 * 1024
EXIT_ERROR = 2


class ServeError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phi3v-edge serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__ + "\nRoutes: POST /v1/chat/completions (JSON or SSE streaming), GET /v1/models, "
                              "GET /health, GET /metrics (Prometheus).",
        epilog="example:\n  phi3v-edge serve bundle/ --port 8000 --max-batch 8\n"
               "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
               "    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 32}'")
    p.add_argument("bundle", help="bundle directory (from `phi3v-edge export`)")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1: this machine only; use 0.0.0.0 with --api-key)")
    net.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port, printed)")
    net.add_argument("--api-key", default=None,
                     help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set, else "
                          "no key); /health and /metrics stay open")
    net.add_argument("--served-model-name", default=None, metavar="NAME",
                     help="the model id clients send and /v1/models lists (default: the bundle folder's name)")
    eng = p.add_argument_group("engine")
    eng.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto",
                     help="execution provider; auto = cuda when onnxruntime has the CUDA provider, else cpu")
    eng.add_argument("--max-batch", type=int, default=4, metavar="B",
                     help="requests decoded together (KV cache slots; also the largest n); default 4")
    eng.add_argument("--max-length", type=int, default=4096, metavar="L",
                     help="KV cache length per slot: prompt (image tokens included) + max_tokens; default 4096")
    eng.add_argument("--max-queue", type=int, default=64, metavar="Q",
                     help="requests waiting for a slot before new ones get 503 with Retry-After; default 64")
    eng.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    eng.add_argument("--long-rope", choices=("auto", "always"), default="auto",
                     help="LongRoPE factors: short up to 4096 tokens then recompute (auto), or long from the start")
    eng.add_argument("--no-cuda-graph", action="store_true", help="CUDA: decode without CUDA graph replay")
    lim = p.add_argument_group("requests")
    lim.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                     help="a request still running S seconds after it arrived is cancelled and answered 504 (or an "
                          "error event once streaming); 0 = no limit; default 600")
    lim.add_argument("--allow-image-urls", action="store_true",
                     help="also accept http(s) image URLs (fetched by the server); data: URLs are always accepted "
                          "and local paths never")
    lim.add_argument("--max-image-bytes", type=int, default=20 * MIB, metavar="N",
                     help=f"largest image accepted, in bytes (data URL or fetched); default {20 * MIB}")
    lim.add_argument("--max-images-per-request", type=int, default=8, metavar="N", help="default 8")
    lim.add_argument("--max-body-bytes", type=int, default=32 * MIB, metavar="N",
                     help=f"largest request body (413 above it); default {32 * MIB}")
    lim.add_argument("--image-fetch-timeout", type=float, default=10.0, metavar="S",
                     help="total time allowed to fetch one image URL; default 10")
    lim.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                     help="on SIGTERM, how long in-flight requests may run before they are cancelled; default 30")
    lg = p.add_argument_group("logging")
    lg.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    lg.add_argument("--access-log", action="store_true", help="log every HTTP request")
    # --ray, --replicas, --autoscale, ... (Ray Serve scale-out: ray_cli.py)
    from .ray_cli import add_ray_arguments

    add_ray_arguments(p)
    return p


def check_extra() -> None:
    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ServeError(f"`phi3v-edge serve` needs {', '.join(missing)}: {INSTALL_HINT}")


def _check_args(a) -> None:
    for name in ("max_batch", "max_queue", "max_image_bytes", "max_images_per_request", "max_body_bytes"):
        if getattr(a, name) < 1:
            raise ServeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not 0 <= a.port <= 65535:
        raise ServeError(f"--port must be in 0..65535, got {a.port}")
    for name in ("request_timeout", "image_fetch_timeout", "drain_timeout"):
        if getattr(a, name) < 0:
            raise ServeError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if not Path(a.bundle).is_dir():
        raise ServeError(f"bundle {a.bundle!r}: no such directory")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        check_extra()
        _check_args(a)
        from .ray_cli import check_ray_args, serve_on_ray

        check_ray_args(a)
        return serve_on_ray(a) if a.ray else serve(a)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR


def serve(a) -> int:
    from ..engine import Engine
    from .app import ServerConfig, create_app

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = a.api_key if a.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(a.host) and not api_key:
        logging.getLogger("phi3v_edge.server").warning(
            "listening on %s without an API key: anyone who can reach it can use it (--api-key)", a.host)
    sock = bind(a.host, a.port)
    port = sock.getsockname()[1]
    shown = f"[{a.host}]" if ":" in a.host else a.host
    print(f"phi3v-edge serve: listening on http://{shown}:{port}", flush=True)
    name = a.served_model_name or Path(a.bundle).resolve().name
    engine = Engine(a.bundle, provider=a.provider, max_batch=a.max_batch, max_length=a.max_length,
                    max_queue=a.max_queue, long_rope=a.long_rope, threads=a.threads,
                    cuda_graph=False if a.no_cuda_graph else None)
    cfg = ServerConfig(model_name=name, api_key=api_key, max_images=a.max_images_per_request,
                       max_image_bytes=a.max_image_bytes, max_body_bytes=a.max_body_bytes,
                       allow_image_urls=a.allow_image_urls, image_fetch_timeout=a.image_fetch_timeout,
                       request_timeout=a.request_timeout or None, drain_timeout=a.drain_timeout)
    app = create_app(engine, cfg)
    return run_app(app, sock, a.log_level, a.access_log, a.drain_timeout)


def run_app(app, sock: socket.socket, log_level: str = "info", access_log: bool = False,
            drain_timeout: float = 30.0) -> int:
    """Serve `app` on a bound socket until SIGTERM / SIGINT; 0 after a graceful stop."""
    import uvicorn

    state = app.state.server

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state.draining = True  # /health says so and new requests get 503 while in-flight ones finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout, timeout_keep_alive=5)
    # uvicorn re-raises the signal that stopped it once it is done; a no-op SIGTERM handler makes a drained
    # server exit 0 instead of dying by that signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
