"""CPU thread count for ONNX Runtime sessions: physical cores this process may run on, unless told otherwise.

    threads argument (Phi3VRuntime(threads=N), `--threads N`)  >  PHI3V_EDGE_THREADS  >  physical cores

Hyper-threads share one core's vector units, so a second thread per core slows MatMulNBits down; a
process pinned to fewer CPUs (taskset, a container's cpuset) gets only the cores it can use. Linux reads
the topology from /sys; elsewhere (or if /sys is unreadable) it falls back to os.cpu_count().
"""
from __future__ import annotations

import os
from pathlib import Path

THREADS_ENV = "PHI3V_EDGE_THREADS"
_SYS_CPU = Path("/sys/devices/system/cpu")


def physical_cores(sys_cpu: Path = _SYS_CPU, cpus: set[int] | None = None) -> int:
    """Distinct (package, core) pairs among the CPUs this process may use; at least 1."""
    if cpus is None:
        try:
            cpus = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = set(range(os.cpu_count() or 1))
    cores = set()
    for c in cpus:
        topo = sys_cpu / f"cpu{c}" / "topology"
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def default_threads(threads: int | None = None) -> int:
    """The intra-op thread count to use: `threads` if given, else $PHI3V_EDGE_THREADS, else physical cores."""
    if threads:
        return int(threads)
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={env!r} is not a whole number of threads") from None
        if n < 1:
            raise ValueError(f"{THREADS_ENV}={env!r}: use 1 or more threads")
        return n
    return physical_cores()
