"""The Ray Serve application: replicas of the OpenAI-compatible server (app.py) behind Ray Serve's HTTP proxy.

Each replica is one Ray actor holding one batching Engine and the very same Starlette app as
`phi3v-edge serve` (routes, request parsing, errors, streaming: create_app over that engine), so answers are
the single-process server's. The app is built per replica (`serve.ingress()` late-bound through
`__serve_build_asgi_app__`), after the engine has loaded and warmed up: Ray only routes to a replica once it can
answer. Every response carries the header `x-phi3v-replica: <replica id>`.

    serve run phi3v_edge.runtime.server.ray_app:build bundle=/models/phi35v-int4 replicas=2
    phi3v-edge serve /models/phi35v-int4 --ray --replicas 2          # the same, from our CLI (ray_cli.py)

and in a Serve config file (`serve deploy config.yaml`), `import_path: phi3v_edge.runtime.server.ray_app:build`
with the same names under `args:` (see README, "Scale-out on Ray Serve"). Needs the extra: pip install
'phi3v-edge[ray]'. Importing this module imports Ray; nothing else in phi3v_edge.runtime imports this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from ray import serve

from .app import ServerConfig, create_app
from .ray_cli import (
    APP_NAME,
    REPLICA_HEADER,
    RayServeError,
    Scale,
    deployment_options,
    parse_autoscale,
)

DEPLOYMENT_NAME = "Phi3V"
API_KEY_ENV = "PHI3V_EDGE_API_KEY"


@dataclass
class AppArgs:
    """The application's arguments (`serve run ... key=value` or a config file's `args:`), typed and checked.

    Scale: replicas, or autoscale "MIN:MAX"; gpus_per_replica (1 = one replica per GPU); cpus_per_replica;
    max_ongoing_requests (default max_batch: what one replica decodes at once). Engine and server: the options
    of `phi3v-edge serve` with underscores."""
    bundle: str
    replicas: int = 1
    autoscale: str | None = None
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int | None = None
    target_ongoing_requests: float | None = None
    provider: str = "auto"
    max_batch: int = 4
    max_length: int = 4096
    max_queue: int = 64
    threads: int | None = None        # default on CPU replicas: cpus_per_replica (replicas share the cores)
    long_rope: str = "auto"
    cuda_graph: bool = True
    served_model_name: str | None = None
    api_key: str | None = None        # default: $PHI3V_EDGE_API_KEY in the replica's environment
    request_timeout: float = 600.0
    allow_image_urls: bool = False
    max_image_bytes: int = 20 * 1024 * 1024
    max_images_per_request: int = 8
    max_body_bytes: int = 32 * 1024 * 1024
    image_fetch_timeout: float = 10.0
    drain_timeout: float = 30.0

    @classmethod
    def from_dict(cls, args: dict) -> AppArgs:
        """Strings (from `serve run key=value`) are converted to each field's type; unknown names are errors."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise RayServeError(f"unknown application argument(s) {', '.join(unknown)}; known: {', '.join(known)}")
        if "bundle" not in args:
            raise RayServeError("the application needs bundle=PATH (a bundle directory on every node)")
        return cls(**{k: _convert(k, known[k].type, v) for k, v in args.items()})

    def scale(self) -> Scale:
        auto = parse_autoscale(self.autoscale) if self.autoscale else None
        return Scale(replicas=None if auto else self.replicas, autoscale=auto, gpus_per_replica=self.gpus_per_replica,
                     cpus_per_replica=self.cpus_per_replica, max_ongoing_requests=self.max_ongoing_requests,
                     target_ongoing_requests=self.target_ongoing_requests)

    def engine_kwargs(self) -> dict:
        threads = self.threads
        if threads is None and not self.gpus_per_replica and self.cpus_per_replica >= 1:
            threads = int(self.cpus_per_replica)
        return {"provider": self.provider, "max_batch": self.max_batch, "max_length": self.max_length,
                "max_queue": self.max_queue, "long_rope": self.long_rope, "threads": threads,
                "cuda_graph": None if self.cuda_graph else False}

    def server_kwargs(self) -> dict:
        return {"model_name": self.served_model_name or os.path.basename(os.path.normpath(self.bundle)),
                "api_key": self.api_key, "max_images": self.max_images_per_request,
                "max_image_bytes": self.max_image_bytes, "max_body_bytes": self.max_body_bytes,
                "allow_image_urls": self.allow_image_urls, "image_fetch_timeout": self.image_fetch_timeout,
                "request_timeout": self.request_timeout or None, "drain_timeout": self.drain_timeout}


def _convert(name: str, kind: str, value):
    if value is None or not isinstance(value, str) or kind.startswith("str"):
        return value
    text = value.strip()
    if "None" in kind and text.lower() in ("", "none", "null"):
        return None
    try:
        if kind.startswith("bool"):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise RayServeError(f"argument {name}: {value!r} is not a {kind.split(' ')[0]}") from None
    return value


class ReplicaHeader:
    """ASGI middleware: adds `x-phi3v-replica: <id>` to every HTTP response of this replica."""

    def __init__(self, app, value: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), value.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


def replica_id() -> str:
    return serve.get_replica_context().replica_id.unique_id


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class Phi3VReplica:
    """One replica: an Engine (loaded and warmed up here) and the server's app over it."""

    def __init__(self, bundle: str, engine_kwargs: dict, server_kwargs: dict):
        from ..engine import Engine

        self.replica = replica_id()
        self.engine = Engine(bundle, **engine_kwargs)
        self.engine.warmup()
        kw = dict(server_kwargs)
        kw["api_key"] = kw.get("api_key") or os.environ.get(API_KEY_ENV) or None
        self.config = ServerConfig(**kw)

    def __serve_build_asgi_app__(self):
        app = create_app(self.engine, self.config, warmup=False)  # warmed up above; shut down with the replica
        app.add_middleware(ReplicaHeader, value=self.replica)
        return app

    def check_health(self) -> None:
        """Ray's periodic replica health check: a replica whose engine loop has stopped is replaced."""
        self.engine.stats()
        if not self.engine.alive:
            raise RuntimeError("the engine's loop thread has stopped")


def build_deployment(args: AppArgs):
    """The bound application (a Serve `Application`) for `serve.run`."""
    if not os.path.isdir(args.bundle):
        raise RayServeError(f"bundle {args.bundle!r}: no such directory (it must exist at this path on every node)")
    opts = deployment_options(args.scale(), args.max_batch)
    return Phi3VReplica.options(**opts).bind(os.path.abspath(args.bundle), args.engine_kwargs(), args.server_kwargs())


def build(args: dict):
    """Application builder for `serve run phi3v_edge.runtime.server.ray_app:build key=value ...` and config files."""
    return build_deployment(AppArgs.from_dict(dict(args)))


__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "AppArgs", "Phi3VReplica", "build", "build_deployment"]
