"""Run `phi3v-edge serve` as a child process (tests, benchmarks): start, wait for /health, stop. Standard library.

    with ServeProcess(bundle, ["--max-batch", "8"], log_path="server.log") as srv:   # port 0: a free port
        print(srv.url)            # http://127.0.0.1:PORT, from the server's first stdout line
    # SIGTERM on exit (the server drains and exits 0), SIGKILL if it is still there after `stop_timeout`
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

LISTENING = "listening on "


class ServeProcess:
    def __init__(self, bundle, args=(), log_path=None, env: dict | None = None, host: str = "127.0.0.1"):
        self.bundle, self.args, self.host = str(bundle), list(args), host
        self.log_path = Path(log_path) if log_path else None
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self._lines: queue.Queue = queue.Queue()
        self._log = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "phi3v_edge.runtime.cli", "serve", self.bundle, "--host", self.host,
                "--port", "0", *self.args]

    def start(self, timeout: float = 120.0) -> ServeProcess:
        """Start the process and wait until /health answers 200; raises RuntimeError (with the log's tail)."""
        env = dict(os.environ if self.env is None else self.env)
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.DEVNULL, text=True, env=env)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        try:
            while self.url is None:
                try:
                    line = self._lines.get(timeout=0.2)
                except queue.Empty:
                    line = ""
                if LISTENING in line:
                    self.url = line.strip().split(LISTENING, 1)[1]
                self._check(deadline)
            while not self.ready():
                self._check(deadline)
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)

    def _check(self, deadline: float) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server was not ready in time:\n{self.log()}")

    def log(self) -> str:
        if self.log_path is None:
            return "(no log file)"
        if self._log not in (None, subprocess.DEVNULL) and not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log not in (None, subprocess.DEVNULL) and not self._log.closed:
            self._log.close()
        return None if self.proc is None else self.proc.returncode

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
