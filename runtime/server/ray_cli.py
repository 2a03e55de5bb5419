"""`phi3v-edge serve BUNDLE --ray`: the same OpenAI-compatible server as N Ray Serve replicas behind one endpoint.

Each replica is one Ray actor holding one batching Engine (one GPU each with --gpus-per-replica 1); Ray Serve's
HTTP proxy routes every request to a replica with a free slot and streams its answer back. Without --address a
private single-node Ray instance is started for the command (loopback only, token auth, its own temp dir) and
stopped with it; with --address the application is deployed onto that existing cluster and deleted on exit.

This module imports no Ray at import time (the CLI checks for the extra first): the deployment options
(`deployment_options`, `parse_autoscale`) and the local head (`LocalRayHead`) are plain Python; the Serve
application itself is ray_app.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .cli import EXIT_ERROR, ServeError

INSTALL_HINT = "pip install 'phi3v-edge[ray]'"
APP_NAME = "phi3v-edge"
REPLICA_HEADER = "x-phi3v-replica"  # every answer through Ray names the replica that produced it
# env for a loopback-only Ray node: Ray resolves 127.0.0.1 to the machine's routable address unless this is 0
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# Ray's hook for middlewares in its HTTP proxy: clean errors when a replica dies mid-request (ray_proxy.py)
REAP_FLAG = "--reap-process-group"
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "phi3v_edge.runtime.server.ray_proxy:middlewares"}


class RayServeError(ServeError):
    pass


# ---- deployment options (plain Python: unit-tested without Ray) -----------------------------------------
def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN:MAX' -> (min, max) with 0 <= min <= max and max >= 1."""
    lo, sep, hi = str(text).partition(":")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise RayServeError(f"--autoscale takes MIN:MAX replicas (for example 1:4), got {text!r}")
    lo_n, hi_n = int(lo), int(hi)
    if hi_n < 1 or lo_n > hi_n:
        raise RayServeError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo_n, hi_n


@dataclass
class Scale:
    replicas: int | None = 1                   # fixed replica count, or None with autoscale
    autoscale: tuple[int, int] | None = None   # (min, max) replicas
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_ongoing_requests: int | None = None    # default: the engine's max_batch
    target_ongoing_requests: float | None = None  # autoscaling target per replica; default max_batch


def deployment_options(scale: Scale, max_batch: int) -> dict:
    """Keyword arguments for `Deployment.options(...)`.

    A replica takes max_batch requests at once (its engine's KV slots); more wait in Ray's router for the first
    replica with a free slot rather than in one engine's queue, so a slow replica does not collect a backlog.
    Autoscaling adds a replica when the ongoing requests per replica (running + queued for it) pass the target."""
    if max_batch < 1:
        raise RayServeError(f"max_batch must be >= 1, got {max_batch}")
    if scale.gpus_per_replica < 0 or scale.cpus_per_replica < 0:
        raise RayServeError("--gpus-per-replica / cpus per replica must be >= 0")
    ongoing = max_batch if scale.max_ongoing_requests is None else scale.max_ongoing_requests
    if ongoing < 1:
        raise RayServeError(f"max_ongoing_requests must be >= 1, got {ongoing}")
    actor = {"num_cpus": scale.cpus_per_replica}
    if scale.gpus_per_replica:
        actor["num_gpus"] = scale.gpus_per_replica
    opts: dict = {"max_ongoing_requests": ongoing, "ray_actor_options": actor}
    if scale.autoscale is not None:
        lo, hi = scale.autoscale
        opts["autoscaling_config"] = {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
            "target_ongoing_requests": scale.target_ongoing_requests or max_batch}
    else:
        n = scale.replicas if scale.replicas is not None else 1
        if n < 1:
            raise RayServeError(f"--replicas must be >= 1, got {n}")
        opts["num_replicas"] = n
    return opts


# ---- a private local Ray node -----------------------------------------------------------------------------
def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free TCP ports on host (held open together while picked, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent(parent: int) -> None:
    """Linux: this process gets SIGTERM when `parent` dies, however it dies (and exits now if it already has)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(1)


def _reap(parent: int, cmd: list[str]) -> int:
    """The head's process-group leader: runs `ray start ...` in its group and, on SIGTERM (from stop(), or from
    the kernel when the process that started it died) or when `ray start` exits, SIGKILLs the whole group, so
    no GCS, raylet, agent or worker outlives it (Ray's agents do not all follow a killed raylet)."""
    def kill_group(*_):
        os.killpg(0, signal.SIGKILL)

    signal.signal(signal.SIGTERM, kill_group)
    signal.signal(signal.SIGINT, kill_group)
    _die_with_parent(parent)
    code = subprocess.call(cmd)
    kill_group()
    return code


def _refresh_imported_ray() -> None:
    """When this process imported Ray before start(): make it see the env just set (Ray caches both at import:
    its C++ config holds RAY_AUTH_MODE, ray_constants the loopback switch). Private Ray names, hence guarded."""
    if "ray" not in sys.modules:
        return
    try:
        from ray._private import ray_constants
        from ray._raylet import AuthenticationTokenLoader, Config

        ray_constants.ENABLE_RAY_CLUSTER = False
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError) as e:  # another Ray version: import ray after start() instead
        print(f"warning: start LocalRayHead before importing ray ({e})", file=sys.stderr)


class LocalRayHead:
    """`ray start --head --block` as a child process group: loopback only, fixed ports, token auth, own temp dir.

    Why not a plain `ray.init()`: the raylet waits a fixed ~15 s for its agents to write their port files and
    aborts when a busy machine makes them slower (ray-project/ray#65983); with every agent port given up front
    it waits for none of them. Its own process group makes the cleanup exact: stop() signals that group only
    (never `ray stop`, which stops every Ray instance on the machine), then removes the temp dir.

        with LocalRayHead(num_cpus=4) as head:
            ray.init(address=head.address)     # this process got RAY_AUTH_MODE / RAY_AUTH_TOKEN from start()

    Start it before this process imports `ray`: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (keep 127.0.0.1
    instead of resolving it to the machine's address) once, at import.
    """

    def __init__(self, num_cpus: int = 2, num_gpus: int | None = None, log_path=None,
                 object_store_memory: int | None = None):
        self.num_cpus, self.num_gpus, self.object_store_memory = num_cpus, num_gpus, object_store_memory
        self.log_path = Path(log_path) if log_path else None
        self.temp_dir: str | None = None
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.env: dict = {}

    def start(self, timeout: float = 180.0) -> LocalRayHead:
        ray_exe = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
        if not Path(ray_exe).exists():
            raise RayServeError(f"the `ray` command is not installed: {INSTALL_HINT}")
        self.temp_dir = tempfile.mkdtemp(prefix="phi3v-ray-")
        gcs, agent_grpc, agent_http, metrics, env_agent, node_mgr, obj_mgr, client = free_ports(8)
        cmd = [ray_exe, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               f"--num-cpus={self.num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
               f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
               f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
               f"--ray-client-server-port={client}", f"--temp-dir={self.temp_dir}"]
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={self.num_gpus}")
        if self.object_store_memory:
            cmd.append(f"--object-store-memory={self.object_store_memory}")
        self.env = {**LOOPBACK_ENV, **PROXY_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        os.environ.update(self.env)  # the driver (this process) connects with the same token
        _refresh_imported_ray()
        if self.log_path is None:
            self.log_path = Path(self.temp_dir, "head.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", __name__, REAP_FLAG, str(os.getpid()), *cmd],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env}, start_new_session=True)
        self.address = f"127.0.0.1:{gcs}"
        deadline = time.monotonic() + timeout
        try:
            while not self._up():
                if self.proc.poll() is not None:
                    raise RayServeError(f"`ray start --head` exited with {self.proc.returncode}" + self._tail())
                if time.monotonic() > deadline:
                    raise RayServeError(f"the local Ray head was not up within {timeout:g} s" + self._tail())
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def _up(self) -> bool:
        # `ray start --block` prints this once the node (GCS, raylet and its agents) is running
        return self.log_path.exists() and "block forever" in self.log_path.read_text(errors="replace")

    def _tail(self) -> str:
        out = ""
        if self.log_path.exists():
            out += ":\n" + self.log_path.read_text(errors="replace")[-3000:]
        raylet_err = Path(self.temp_dir or "", "session_latest", "logs", "raylet.out")
        if raylet_err.exists():
            lines = [ln for ln in raylet_err.read_text(errors="replace").splitlines() if " C " in ln or " E " in ln]
            out += "\nraylet errors:\n" + "\n".join(lines[-10:])
        return out

    def pids(self) -> list[int]:
        """Processes still in this head's process group (the Ray processes it started)."""
        if self.proc is None:
            return []
        out = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if os.getpgid(int(p.name)) == self.proc.pid:
                        out.append(int(p.name))
                except (ProcessLookupError, PermissionError):
                    pass
        return out

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the process group (its leader then SIGKILLs it), SIGKILL whatever is left after `grace` s,
        remove the temp dir."""
        if self.proc is not None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while self.pids() and time.monotonic() < deadline:
                    time.sleep(0.2)
                if not self.pids():
                    break
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- the CLI: phi3v-edge serve BUNDLE --ray ---------------------------------------------------------------
def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    """The `--ray` option group of `phi3v-edge serve` (cli.build_parser calls this)."""
    g = p.add_argument_group("Ray Serve (scale-out; needs the extra: pip install 'phi3v-edge[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve from Ray Serve replicas (one engine each) behind Ray's HTTP proxy on --host/--port, "
                        "instead of one process")
    g.add_argument("--replicas", type=int, default=None, metavar="N", help="fixed number of replicas (default 1)")
    g.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="autoscale between MIN and MAX replicas on ongoing requests per replica (target: "
                        "--max-batch); instead of --replicas")
    g.add_argument("--gpus-per-replica", type=float, default=0.0, metavar="G",
                   help="GPUs each replica reserves (1 = one replica per GPU; 0.5 = two per GPU); default 0")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, metavar="C",
                   help="CPUs each replica reserves; CPU replicas also default --threads to it; default 1")
    g.add_argument("--max-ongoing-requests", type=int, default=None, metavar="R",
                   help="requests Ray sends one replica at once (default --max-batch: the rest wait in Ray's "
                        "router for the first replica with a free slot)")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="an existing Ray cluster (host:port of `ray start --head`, or 'auto'); the application is "
                        "deployed there and deleted on exit. Default: a private local Ray for this command")
    g.add_argument("--ray-num-cpus", type=int, default=None, metavar="N",
                   help="CPUs of the private local Ray (default: this machine's); ignored with --address")


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """A host:port --address answers TCP (Ray itself would retry for minutes before saying anything)."""
    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise RayServeError(f"--address takes HOST:PORT of a Ray head (or 'auto'), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayServeError(f"no Ray cluster answers at {address}: {e.strerror or e} (start one with "
                            f"`ray start --head --port {port}`)") from None


def check_ray_args(a) -> None:
    ray_only = [name for name, default in (("replicas", None), ("autoscale", None), ("gpus_per_replica", 0.0),
                                            ("cpus_per_replica", 1.0), ("max_ongoing_requests", None),
                                            ("address", None), ("ray_num_cpus", None))
                if getattr(a, name, default) != default]
    if not getattr(a, "ray", False):
        if ray_only:
            raise RayServeError(f"--{ray_only[0].replace('_', '-')} needs --ray")
        return
    if a.replicas is not None and a.autoscale is not None:
        raise RayServeError("give --replicas N or --autoscale MIN:MAX, not both")
    if importlib.util.find_spec("ray") is None:
        raise RayServeError(f"--ray needs Ray Serve: {INSTALL_HINT}")


def app_args_dict(a) -> dict:
    """The namespace of `phi3v-edge serve` -> ray_app.AppArgs fields."""
    return {"bundle": a.bundle, "replicas": 1 if a.replicas is None else a.replicas, "autoscale": a.autoscale,
            "gpus_per_replica": a.gpus_per_replica, "cpus_per_replica": a.cpus_per_replica,
            "max_ongoing_requests": a.max_ongoing_requests, "provider": a.provider, "max_batch": a.max_batch,
            "max_length": a.max_length, "max_queue": a.max_queue, "threads": a.threads, "long_rope": a.long_rope,
            "cuda_graph": not a.no_cuda_graph, "served_model_name": a.served_model_name, "api_key": a.api_key,
            "request_timeout": a.request_timeout, "allow_image_urls": a.allow_image_urls,
            "max_image_bytes": a.max_image_bytes, "max_images_per_request": a.max_images_per_request,
            "max_body_bytes": a.max_body_bytes, "image_fetch_timeout": a.image_fetch_timeout,
            "drain_timeout": a.drain_timeout}


def serve_on_ray(a) -> int:
    """Deploy the application, print the endpoint, serve until SIGTERM / Ctrl-C, then delete it (and stop the
    private Ray, if this command started one). Returns the exit code."""
    check_ray_args(a)
    api_key = a.api_key if a.api_key is not None else os.environ.get("PHI3V_EDGE_API_KEY") or None
    if a.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {a.host} without an API key (--api-key)", file=sys.stderr)
    auto = parse_autoscale(a.autoscale) if a.autoscale else None  # bad options fail before Ray starts
    deployment_options(Scale(replicas=None if auto else (1 if a.replicas is None else a.replicas), autoscale=auto,
                             gpus_per_replica=a.gpus_per_replica, cpus_per_replica=a.cpus_per_replica,
                             max_ongoing_requests=a.max_ongoing_requests), a.max_batch)
    if a.address is not None:
        check_reachable(a.address)
    head = None
    stop = threading.Event()
    try:
        if a.address is None:
            head = LocalRayHead(num_cpus=a.ray_num_cpus or os.cpu_count() or 1).start()
        import ray
        from ray import serve

        from .ray_app import AppArgs, build_deployment

        args = AppArgs.from_dict(app_args_dict(a))
        app = build_deployment(args)  # checks the options before anything is deployed
        ray.init(address=head.address if head else a.address, include_dashboard=False, log_to_driver=False)
        port = a.port or free_ports(1, a.host if a.host != "localhost" else "127.0.0.1")[0]
        serve.start(http_options={"host": a.host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own handlers
            signal.signal(sig, lambda *_: stop.set())
        shown = f"[{a.host}]" if ":" in a.host else a.host
        scale = f"autoscale {a.autoscale}" if a.autoscale else f"{args.replicas} replica(s)"
        scale += f", private Ray in {head.temp_dir}" if head else f", Ray cluster {a.address}"
        print(f"phi3v-edge serve: listening on http://{shown}:{port} (Ray Serve, {scale})", flush=True)
        while not stop.wait(1.0):
            pass
        return 0
    except RayServeError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray's own errors (cluster unreachable, deployment failed): say it, no traceback
        print(f"error: Ray Serve: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        _teardown(head)


def _teardown(head) -> None:
    if "ray" in sys.modules:
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                if head is None:
                    serve.delete(APP_NAME)  # someone else's cluster: remove our application only
                else:
                    serve.shutdown()
            except Exception as e:  # noqa: BLE001 - best effort on the way out
                print(f"warning: Ray Serve cleanup: {e}", file=sys.stderr)
            ray.shutdown()
    if head is not None:
        head.stop()


if __name__ == "__main__" and sys.argv[1:2] == [REAP_FLAG]:
    sys.exit(_reap(int(sys.argv[2]), sys.argv[3:]))
