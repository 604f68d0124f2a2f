"""Real peers for integration tests: the server under twistd, and SIPp.

The server runs as users run it (`twistd -n sipproxy --config FILE`) in a
subprocess, on free loopback ports; SIPp plays the phones. When CI=true a
missing SIPp is a failure, not a skip, so CI cannot pass without the peer.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import SkipTest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
SCENARIOS = os.path.join(REPO, "tests", "scenarios")


def require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"{program} is not installed; .ci/run must install it")
        raise SkipTest(f"{program} is not installed")
    return path


def eventually(condition, what: str, timeout: float = 10.0, context=lambda: ""):
    """`condition()`'s first true value within `timeout` seconds (polled every 50 ms), else AssertionError naming
    `what` and adding `context()` (the servers' logs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s{context()}")


def end_process(process: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace` seconds; nothing if it has ended."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


_GIVEN: set[int] = set()  # ports this test run has handed out: the kernel may offer a closed one again


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1, and not given out before in this run.

    Without the memory, two calls for one server's listeners could return the same
    port (nothing holds it in between) and the server failed to start: "Address
    already in use" for its second listener, twice in one CI run.
    """
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            if port in _GIVEN:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                _GIVEN.add(port)
                return port
    raise RuntimeError("no free port")


def options_probe(port: int, timeout: float = 0.3, host: str = "127.0.0.1") -> bytes | None:
    """Send one OPTIONS over UDP; the response bytes, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        local = s.getsockname()[1]
        s.settimeout(timeout)
        msg = (
            f"OPTIONS sip:{host}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{local};branch=z9hG4bKprobe{time.monotonic_ns()}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:probe@{host}>;tag=p\r\nTo: <sip:{host}>\r\n"
            f"Call-ID: probe-{time.monotonic_ns()}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
        )
        s.sendto(msg.encode(), (host, port))
        try:
            return s.recv(65535)
        except OSError:
            return None


class ServerProcess:
    """`twistd -n sipproxy` in a subprocess with a config written for the test."""

    def __init__(self, config_text: str = "", port: int | None = None, state_dir: str | None = None,
                 admin_port: int | None = None, pythonpath: tuple[str, ...] = (), server_extra: str = "",
                 host: str = "127.0.0.1"):
        """`host`: the loopback address it listens on (several nodes: 127.0.0.2, 127.0.0.3)."""
        self.pythonpath = pythonpath
        self.host = host
        self.port = port or free_port()
        self.admin_port = admin_port or free_port()
        self.web_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="sipproxy-test-")
        self.state_dir = state_dir or os.path.join(self.dir, "state")
        self.config_path = os.path.join(self.dir, "sipproxy.toml")
        self.log_path = os.path.join(self.dir, "twistd.log")
        with open(self.config_path, "w") as f:
            f.write(
                "[server]\n"
                f'listen = ["udp:{self.port}:interface={host}", "tcp:{self.port}:interface={host}"]\n'
                f'state_dir = "{self.state_dir}"\n'
                'domains = ["localhost", "127.0.0.1"]\n'
                + server_extra +
                f'[admin]\nlisten = "tcp:{self.admin_port}:interface=127.0.0.1"\n'
                f'[phone_web]\nlisten = "tcp:{self.web_port}:interface=127.0.0.1"\n'
                + config_text
            )
        self.process = None

    def start(self, timeout: float = 15.0) -> "ServerProcess":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join((REPO, *self.pythonpath, os.environ.get("PYTHONPATH", ""))))
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "--logfile", self.log_path,
             "sipproxy", "--config", self.config_path],
            cwd=self.dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                out = self.process.stdout.read().decode(errors="replace")
                raise AssertionError(f"server exited with {self.process.returncode}: {out}\n{self.log()}")
            if options_probe(self.port, host=self.host):
                return self
        self.stop()
        raise AssertionError(f"server did not answer within {timeout} s\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (what a crash or a pulled plug does)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        end_process(self.process)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run `sipproxy-admin -c <this server's config> ...`."""
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        result = subprocess.run([sys.executable, "-m", "proxy.admin.cli", "-c", self.config_path, *args],
                                env=env, capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise AssertionError(f"sipproxy-admin {' '.join(args)} failed: {result.stderr}")
        return result

    def phone_get(self, path: str, timeout: float = 10.0) -> tuple[dict, bytes]:
        """GET from the phone-facing site, as a phone would: (headers, body)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}{path}", timeout=timeout) as response:
            return dict(response.headers), response.read()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def run_sipp(scenario: str, port: int, *, transport: str = "u1", calls: int = 1, extra: list[str] = (),
             timeout: float = 15.0, injection: list[tuple[str, ...]] | None = None,
             local_port: int | None = None, local_ip: str = "127.0.0.1",
             server_host: str = "127.0.0.1") -> subprocess.CompletedProcess:
    """Run a SIPp scenario from tests/scenarios against 127.0.0.1:port; returns the finished process.

    `injection` rows become SIPp's -inf file ([field0], [field1]...), one row per call, in order.
    """
    sipp = require("sipp")
    workdir = tempfile.mkdtemp(prefix="sipp-")
    if injection is not None:
        path = os.path.join(workdir, "injection.csv")
        with open(path, "w") as f:
            f.write("SEQUENTIAL\n" + "".join(";".join(row) + ";\n" for row in injection))
        extra = ["-inf", path, *extra]
    args = [sipp, "-sf", os.path.join(SCENARIOS, scenario), "-i", local_ip, "-p", str(local_port or free_port()),
            "-t", transport, "-m", str(calls), "-nostdin", "-timeout", f"{int(timeout)}s",
            "-timeout_error", "-trace_err", "-trace_stat", *extra, f"{server_host}:{port}"]
    result = subprocess.run(args, cwd=workdir, capture_output=True, timeout=timeout + 30)
    result.workdir = workdir
    return result


def sipp_errors(result: subprocess.CompletedProcess) -> str:
    out = []
    for name in os.listdir(result.workdir):
        if name.endswith("_errors.log"):
            with open(os.path.join(result.workdir, name), errors="replace") as f:
                out.append(f.read())
    return "\n".join(out) + result.stdout.decode(errors="replace")[-3000:]


class SippPeer:
    """A SIPp process in the background (a callee or a gateway), on a fixed local port."""

    def __init__(self, scenario: str, server_port: int, *, port: int | None = None, calls: int = 1,
                 extra: list[str] = (), timeout: float = 30.0):
        sipp = require("sipp")
        self.port = port or free_port()
        self.workdir = tempfile.mkdtemp(prefix="sipp-peer-")
        self.process = subprocess.Popen(
            [sipp, "-sf", os.path.join(SCENARIOS, scenario), "-i", "127.0.0.1", "-p", str(self.port),
             "-m", str(calls), "-nostdin", "-timeout", f"{int(timeout)}s", "-timeout_error", "-trace_err",
             *extra, f"127.0.0.1:{server_port}"],
            cwd=self.workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        time.sleep(0.3)  # let it bind before anything is sent to it

    def wait(self, timeout: float = 40.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            return -1
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def errors(self) -> str:
        out = []
        for name in os.listdir(self.workdir):
            if name.endswith("_errors.log"):
                with open(os.path.join(self.workdir, name), errors="replace") as f:
                    out.append(f.read()[-3000:])
        return "\n".join(out)
