"""Run ``mlflow models serve`` for a ptycho_torch model on loopback, and drive it with bounded load.

Test tooling (not part of the package): used by the tests, ``scripts/load_test.py`` and the benchmarks, which
put this folder on ``sys.path`` and ``import serving_tools``: it starts the real scoring server as a subprocess on a
free loopback port, waits for ``/ping``, and stops the whole process group afterwards. Nothing here talks to
anything but ``127.0.0.1``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mlflow_ptycho_flavor.cli import interpreter_env

__all__ = ["ModelServer", "free_port", "post_json", "LoadReport", "run_load"]

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def post_json(url: str, body: Any, *, timeout: float = 60.0) -> tuple[int, Any]:
    """POST a JSON body; returns (status, decoded JSON or text). Never raises for HTTP error statuses.

    The answer is decoded as strict JSON: a body with bare ``NaN``/``Infinity`` tokens (which Python's ``json``
    would accept) comes back as text, so checks that expect decoded JSON fail on it.
    """
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    if isinstance(data, str):
        data = data.encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    try:
        return status, json.loads(payload, parse_constant=_refuse_constant)
    except ValueError:
        return status, payload.decode(errors="replace")


@dataclass
class ModelServer:
    """``mlflow models serve -m <model_uri> --env-manager local`` on a free loopback port.

    Use as a context manager; :attr:`url` is the base URL. ``env`` adds environment variables (e.g. the
    tracking URI for ``models:/`` URIs). The child runs this interpreter (``sys.executable -m mlflow``) with its
    ``bin`` folder first on ``PATH`` (:func:`interpreter_env`), so it works without an activated venv.
    """

    model_uri: str
    port: int = 0
    workers: int = 1
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 240.0
    log_path: Path | None = None
    _process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> "ModelServer":
        self.port = self.port or free_port()
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(self.model_uri), "-h", LOOPBACK,
                   "-p", str(self.port), "--env-manager", "local", "-w", str(self.workers)]
        env = interpreter_env(self.env)
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited with {self._process.returncode} during start-up"
                                   + (f"; log: {self.log_path}" if self.log_path else ""))
            if self.alive():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow models serve did not answer /ping within {self.startup_timeout:.0f} s")

    def alive(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def invoke(self, body: Any, *, timeout: float = 60.0) -> tuple[int, Any]:
        return post_json(f"{self.url}/invocations", body, timeout=timeout)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, PermissionError):
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def __enter__(self) -> "ModelServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@dataclass
class LoadReport:
    """Outcome of :func:`run_load`: counts, latency percentiles in milliseconds, wrong answers."""

    requests: int
    concurrency: int
    seconds: float
    status_counts: dict[int, int]
    wrong_answers: int
    unexpected_status: int
    latencies_ms: list[float] = field(repr=False, default_factory=list)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        return float(np.percentile(self.latencies_ms, q))

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    def as_row(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 2),
            "req/s": round(self.throughput, 1),
            "p50 ms": round(self.p50, 1),
            "p99 ms": round(self.p99, 1),
            "mean ms": round(statistics.fmean(self.latencies_ms), 1) if self.latencies_ms else None,
            "status": dict(sorted(self.status_counts.items())),
            "wrong answers": self.wrong_answers,
            "unexpected status": self.unexpected_status,
        }


def run_load(
    server: ModelServer,
    cases: Sequence[tuple[Any, Callable[[int, Any], bool]]],
    *,
    requests: int,
    concurrency: int,
    timeout: float = 60.0,
    progress: bool = False,
) -> LoadReport:
    """Send ``requests`` POSTs (cycling through ``cases``) from ``concurrency`` threads; bounded in count.

    Each case is ``(body, check)``; ``check(status, payload)`` says whether the answer is right (for valid
    payloads: the numbers; for invalid ones: a 4xx). A failed check counts as a wrong answer.
    """
    lock = threading.Lock()
    status_counts: dict[int, int] = {}
    latencies: list[float] = []
    wrong = unexpected = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=requests, desc="load", unit="req")

    def one(index: int) -> None:
        nonlocal wrong, unexpected
        body, check = cases[index % len(cases)]
        started = time.perf_counter()
        try:
            status, payload = server.invoke(body, timeout=timeout)
        except Exception:  # a dropped connection counts as a wrong answer
            status, payload = -1, None
        elapsed = (time.perf_counter() - started) * 1000
        ok = status != -1 and check(status, payload)
        with lock:
            status_counts[status] = status_counts.get(status, 0) + 1
            latencies.append(elapsed)
            if not ok:
                wrong += 1
            if status == -1 or status >= 500:
                unexpected += 1
            if bar is not None:
                bar.update(1)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - started
    if bar is not None:
        bar.close()
    return LoadReport(requests, concurrency, seconds, status_counts, wrong, unexpected, latencies)
