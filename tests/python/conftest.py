"""Fixtures for the cross-language client test.

The tests talk to a real `bluetick-dev` cluster only through Python stubs generated from
`proto/` into `tests/python/gen/` (run `scripts/python-client-test.sh`, which builds the
binary, prepares the venv and generates the stubs, then runs pytest).

Environment:
  BLUETICK_DEV_BIN              the bluetick-dev executable (default target/debug/bluetick-dev)
  BLUETICK_TEST_WORK_DIR        where the cluster's data, log, endpoints file and pidfile go
                                (default: a pytest temporary directory)
  BLUETICK_CLUSTER_START_TIMEOUT_S  how long to wait for the endpoints file (default 90)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent.parent
GEN_DIR = TESTS_DIR / "gen"

if not (GEN_DIR / "bluetick" / "gateway" / "v1" / "chat_pb2_grpc.py").is_file():
    raise RuntimeError(
        f"generated stubs missing in {GEN_DIR}: run scripts/python-client-test.sh "
        "(or make test-python), which generates them from proto/"
    )
# gen/ is the import root of the generated modules (they import bluetick.common.v1...).
sys.path.insert(0, str(GEN_DIR))

from chat_session import RPC_TIMEOUT_S  # noqa: E402  (needs gen/ on sys.path)


@dataclass(frozen=True)
class Cluster:
    """A running bluetick-dev process and where its services listen."""

    process: subprocess.Popen
    endpoints: dict[str, str]
    log_path: Path

    def grpc_target(self, service: str) -> str:
        """Returns "host:port" for a service named in the endpoints file."""
        url = self.endpoints.get(service)
        assert url, f"endpoints file has no {service!r} entry: {self.endpoints}"
        parts = urllib.parse.urlsplit(url)
        assert parts.scheme == "http" and parts.hostname and parts.port, (
            f"unexpected {service} endpoint {url!r}, expected http://127.0.0.1:PORT"
        )
        assert parts.hostname in ("127.0.0.1", "localhost", "::1"), (
            f"{service} endpoint {url!r} is not on loopback"
        )
        return parts.netloc


def _log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no cluster log)"


def _wait_for_endpoints(
    process: subprocess.Popen, endpoints_file: Path, log_path: Path, timeout_s: float
) -> dict[str, str]:
    """Polls until the cluster has written a complete endpoints file.

    The file appears only once every server listens. It may be caught half written, so a
    parse error is retried until the deadline.
    """
    deadline = time.monotonic() + timeout_s
    last_error = "file not created"
    while time.monotonic() < deadline:
        exit_code = process.poll()
        if exit_code is not None:
            pytest.fail(
                f"bluetick-dev exited with code {exit_code} before writing {endpoints_file}\n"
                f"--- cluster log tail ---\n{_log_tail(log_path)}",
                pytrace=False,
            )
        if endpoints_file.is_file():
            try:
                endpoints = json.loads(endpoints_file.read_text())
                if isinstance(endpoints, dict) and endpoints.get("gateway"):
                    return endpoints
                last_error = f"no gateway entry yet: {endpoints!r}"
            except ValueError as error:
                last_error = f"not valid JSON yet: {error}"
        time.sleep(0.05)
    pytest.fail(
        f"bluetick-dev wrote no usable {endpoints_file} within {timeout_s}s ({last_error})\n"
        f"--- cluster log tail ---\n{_log_tail(log_path)}",
        pytrace=False,
    )


def _stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stops the cluster by its PID: SIGTERM (graceful shutdown), SIGKILL after grace_s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        print(
            f"bluetick-dev (pid {process.pid}) ignored SIGTERM for {grace_s}s; killing it",
            file=sys.stderr,
        )
        process.kill()
        process.wait(timeout=grace_s)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Starts bluetick-dev on ephemeral loopback ports for the whole session."""
    dev_bin = Path(
        os.environ.get("BLUETICK_DEV_BIN") or REPO_ROOT / "target" / "debug" / "bluetick-dev"
    )
    if not os.access(dev_bin, os.X_OK):
        pytest.fail(
            f"bluetick-dev binary not found at {dev_bin}: build it with "
            "`cargo build -p bluetick-dev --bin bluetick-dev` (scripts/python-client-test.sh does)",
            pytrace=False,
        )
    work_dir_env = os.environ.get("BLUETICK_TEST_WORK_DIR")
    work_dir = Path(work_dir_env).resolve() if work_dir_env else tmp_path_factory.mktemp("cluster")
    work_dir.mkdir(parents=True, exist_ok=True)
    data_dir = work_dir / "data"
    endpoints_file = work_dir / "endpoints.json"
    log_path = work_dir / "cluster.log"
    pidfile = work_dir / "cluster.pid"
    endpoints_file.unlink(missing_ok=True)
    data_dir.mkdir(exist_ok=True)

    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    env.setdefault("NO_COLOR", "1")  # plain text in cluster.log
    timeout_s = float(os.environ.get("BLUETICK_CLUSTER_START_TIMEOUT_S", "90"))
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [
                str(dev_bin),
                "--data-dir",
                str(data_dir),
                "--ephemeral-ports",
                "--endpoints-file",
                str(endpoints_file),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    # Lets the calling script stop the cluster by PID if pytest dies without teardown.
    pidfile.write_text(f"{process.pid}\n")
    try:
        endpoints = _wait_for_endpoints(process, endpoints_file, log_path, timeout_s)
        yield Cluster(process=process, endpoints=endpoints, log_path=log_path)
        exit_code = process.poll()
        assert exit_code is None, (
            f"bluetick-dev exited with code {exit_code} during the tests\n"
            f"--- cluster log tail ---\n{_log_tail(log_path)}"
        )
    finally:
        _stop(process)
        pidfile.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def gateway_channel(cluster: Cluster):
    """An insecure channel to the gateway, connected before it is handed out."""
    channel = grpc.insecure_channel(cluster.grpc_target("gateway"))
    try:
        grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        channel.close()
        pytest.fail(
            f"gateway at {cluster.endpoints['gateway']} did not accept a connection "
            f"within {RPC_TIMEOUT_S}s\n--- cluster log tail ---\n{_log_tail(cluster.log_path)}",
            pytrace=False,
        )
    yield channel
    channel.close()
