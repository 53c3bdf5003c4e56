"""A real Prometheus server for tests: scrapes one target every second and answers PromQL.

    with Prometheus("127.0.0.1:8123", tmp_path) as prom:
        prom.wait_for('up{job="junction"}', 1)
        prom.query('sum(junction_decode_steps_total)')

It runs the `prometheus` binary on PATH (`make prometheus` installs Debian's package) with its
own configuration, storage and port under the given folder, and stops it on exit.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import httpx

PROMETHEUS_BIN = shutil.which("prometheus")
JOB = "junction"

CONFIG = """\
global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
  evaluation_interval: {interval}
scrape_configs:
  - job_name: {job}
    metrics_path: {path}
    static_configs:
      - targets: ["{target}"]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    def __init__(
        self,
        target: str,
        workdir: Path,
        metrics_path: str = "/metrics",
        interval: str = "1s",
        binary: str | None = None,
    ) -> None:
        binary = binary or PROMETHEUS_BIN
        if binary is None:
            raise FileNotFoundError("prometheus is not on PATH (make prometheus installs it)")
        self.binary = binary
        self.workdir = workdir
        self.config = CONFIG.format(interval=interval, job=JOB, path=metrics_path, target=target)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        self._proc: subprocess.Popen | None = None
        self._http = httpx.Client(base_url=self.url, timeout=5.0)

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        config = self.workdir / "prometheus.yml"
        config.write_text(self.config)
        (self.workdir / "data").mkdir(exist_ok=True)
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self._proc.returncode}): {self._tail()}")
            try:
                if self._http.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout:.0f}s: {self._tail()}")

    def stop(self) -> None:
        self._http.close()
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def query_vector(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of an instant query, as (labels, value)."""
        resp = self._http.get("/api/v1/query", params={"query": promql})
        body = resp.json()
        if resp.status_code != 200 or body.get("status") != "success":
            raise ValueError(f"query {promql!r} failed: {body.get('error', resp.text)}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise ValueError(f"query {promql!r}: {data['resultType']}, not an instant vector")
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def query(self, promql: str) -> float:
        """The value of a query that yields exactly one sample."""
        samples = self.query_vector(promql)
        if len(samples) != 1:
            raise LookupError(f"query {promql!r}: {len(samples)} samples, expected 1")
        return samples[0][1]

    def wait_for(
        self, promql: str, want: float | Callable[[float], bool], timeout: float = 15.0
    ) -> float:
        """Poll until the query has one sample that equals `want` (or satisfies it)."""
        accept = want if callable(want) else (lambda v: v == want)
        deadline = time.monotonic() + timeout
        last: object = "no sample"
        while time.monotonic() < deadline:
            try:
                last = self.query(promql)
                if accept(last):
                    return last
            except LookupError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{promql!r} never became {want} in {timeout:.0f}s (last: {last})")

    def _tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""
