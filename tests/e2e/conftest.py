"""Fixtures for the end-to-end suite: real processes, real Kafka protocol.

Each test gets its own mock broker process (`bench/src/mock_broker.rs`, holding
librdkafka's mock cluster) and its own `timbridge serve` process configured
against it, so that a test can count every record on the topics.

The suite does not build anything. Run first:

    cargo build --workspace --bins

`TIMBRIDGE_BIN` and `MOCK_BROKER_BIN` point at other builds (e.g. release).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import http.client
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import helpers
from helpers import REPO_ROOT

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


def _binary(env_name: str, default: Path) -> Path:
    raw = os.environ.get(env_name)
    path = Path(raw) if raw else default
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"{path} is missing or not executable. The e2e suite does not build: run "
            f"`cargo build --workspace --bins` in {REPO_ROOT} first, or set {env_name}.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def timbridge_bin() -> Path:
    return _binary("TIMBRIDGE_BIN", REPO_ROOT / "target" / "debug" / "timbridge")


@pytest.fixture(scope="session")
def mock_broker_bin() -> Path:
    return _binary("MOCK_BROKER_BIN", REPO_ROOT / "target" / "debug" / "mock_broker")


def _register_log(request, name: str, path: Path) -> None:
    logs = getattr(request.node, "_e2e_logs", [])
    logs.append((name, path))
    request.node._e2e_logs = logs


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attaches the processes' logs to the report of a failed test."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, path in getattr(item, "_e2e_logs", []):
            try:
                text = Path(path).read_text(errors="replace")
            except OSError as e:
                text = f"(cannot read: {e})"
            if len(text) > 30000:
                text = "…(truncated)…\n" + text[-30000:]
            report.sections.append((f"{name} output ({path})", text))


# --------------------------------------------------------------------------
# The broker
# --------------------------------------------------------------------------


class MockBroker:
    """A running `mock_broker` process and its stdin control channel."""

    def __init__(self, binary: Path, log_path: Path, topics: dict[str, int], brokers: int = 1):
        argv = [str(binary), "--brokers", str(brokers)]
        for topic, partitions in topics.items():
            argv += ["--topic", f"{topic}:{partitions}"]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        first = self._next_line(15.0, "the BOOTSTRAP line")
        if not first.startswith("BOOTSTRAP="):
            self.stop()
            raise AssertionError(f"mock_broker printed {first!r} instead of BOOTSTRAP=…")
        self.bootstrap = first.split("=", 1)[1].strip()
        assert self.bootstrap, "mock_broker printed an empty bootstrap list"
        for host_port in self.bootstrap.split(","):
            assert host_port.startswith("127.0.0.1:"), f"mock broker not on 127.0.0.1: {self.bootstrap}"

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _next_line(self, timeout: float, what: str) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"mock_broker: no answer within {timeout}s while waiting for {what}")
        if line is None:
            raise AssertionError(
                f"mock_broker exited (code {self.proc.poll()}) while waiting for {what}; "
                f"stderr: {self.log_path.read_text(errors='replace')[-2000:]}"
            )
        return line

    def control(self, command: str) -> None:
        """Sends one command (`down 1`, `up 1`, `rtt 1 50`) and requires `ok`."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self._next_line(10.0, f"the answer to {command!r}")
        assert answer == "ok", f"mock_broker answered {answer!r} to {command!r}"

    def down(self, broker_id: int = 1) -> None:
        self.control(f"down {broker_id}")

    def up(self, broker_id: int = 1) -> None:
        self.control(f"up {broker_id}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def mock_broker(mock_broker_bin, tmp_path, request) -> MockBroker:
    log = tmp_path / "mock_broker.log"
    _register_log(request, "mock_broker", log)
    topics = {t: helpers.TOPIC_PARTITIONS for t in helpers.ALL_TOPICS}
    broker = MockBroker(mock_broker_bin, log, topics)
    yield broker
    broker.stop()


# --------------------------------------------------------------------------
# The gateway
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_str(value: str) -> str:
    # A JSON string is a valid TOML basic string for everything we write.
    return json.dumps(value)


def gateway_config(spool_dir: Path, max_body_bytes: int) -> str:
    return f"""\
# Written by tests/e2e/conftest.py. The listen address and the brokers come
# from the command line (--listen, --brokers).
[server]
callback_path = {toml_str(helpers.CALLBACK_PATH)}
max_body_bytes = {max_body_bytes}

[[apps]]
sdk_app_id = {helpers.SIGNED_APP}
token = {toml_str(helpers.SIGNED_APP_TOKEN)}

[[apps]]
sdk_app_id = {helpers.UNSIGNED_APP}

[kafka]
group_topic = {toml_str(helpers.GROUP_TOPIC)}
c2c_topic = {toml_str(helpers.C2C_TOPIC)}
raw_topic = {toml_str(helpers.RAW_TOPIC)}

[spool]
dir = {toml_str(str(spool_dir))}
"""


@dataclass
class Gateway:
    name: str
    proc: subprocess.Popen
    port: int
    config_path: Path
    log_path: Path
    exit_code: int | None = field(default=None)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def callback_url(self) -> str:
        return self.base_url + helpers.CALLBACK_PATH

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                with open(self.log_path, "a") as log:
                    log.write(f"\n[e2e] no exit within {timeout}s of SIGTERM: SIGKILLed\n")
        self.exit_code = self.proc.returncode
        return self.exit_code


def _healthz(port: int) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status
        finally:
            conn.close()
    except OSError:
        return None


def start_gateway(
    timbridge_bin: Path,
    bootstrap: str,
    workdir: Path,
    name: str = "timbridge",
    max_body_bytes: int = helpers.MAX_BODY_BYTES,
) -> Gateway:
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.toml"
    config_path.write_text(gateway_config(workdir / "spool", max_body_bytes))
    log_path = workdir / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIMBRIDGE_")}

    for _attempt in range(3):
        port = free_port()
        argv = [
            str(timbridge_bin), "serve",
            "--config", str(config_path),
            "--listen", f"127.0.0.1:{port}",
            "--brokers", bootstrap,
        ]
        with open(log_path, "ab") as log:
            log.write(f"[e2e] $ {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=workdir, env=env, start_new_session=True,
            )
        gw = Gateway(name, proc, port, config_path, log_path)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _healthz(port) == 200:
                return gw
            time.sleep(0.05)
        if proc.poll() is None:
            gw.stop()
            raise AssertionError(
                f"{name}: GET /healthz did not answer 200 within {STARTUP_TIMEOUT_S}s\n{gw.log_text()[-5000:]}"
            )
        text = gw.log_text()
        if "in use" not in text.lower():  # lost the free-port race: try another port
            raise AssertionError(f"{name} exited with code {proc.returncode} during startup:\n{text[-5000:]}")
    raise AssertionError(f"{name}: no free port after 3 attempts:\n{gw.log_text()[-5000:]}")


@pytest.fixture
def gateway_factory(timbridge_bin, mock_broker, tmp_path, request):
    """Starts gateways against the test's broker; stops them all at teardown."""
    started: list[Gateway] = []

    def start(name: str = "timbridge", **kwargs) -> Gateway:
        log_name = f"{name}-{len(started)}"
        _register_log(request, log_name, tmp_path / log_name / f"{log_name}.log")
        gw = start_gateway(timbridge_bin, mock_broker.bootstrap, tmp_path / log_name, log_name, **kwargs)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def gateway(gateway_factory) -> Gateway:
    return gateway_factory()
