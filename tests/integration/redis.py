"""Real, throwaway Redis servers and Sentinels on free loopback ports (like slapd.py).

`RedisServer().start()` runs `redis-server` in the foreground with no
persistence to disk unless asked; `replica_of` makes it a replica.
`Sentinels(primary, n)` starts n `redis-sentinel`s watching it under the name
"sipproxy", with a 1 s down-after so a killed primary is replaced in a few
seconds. When CI=true a missing program is a failure.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time

from tests.integration.harness import end_process, free_port, require

SERVICE = "sipproxy"


def redis_command(port: int, *args: str, timeout: float = 2.0, cli_options: tuple[str, ...] = ()) -> bytes:
    """One command through redis-cli (the raw reply text)."""
    result = subprocess.run([shutil.which("redis-cli") or "redis-cli", "-h", "127.0.0.1", "-p", str(port),
                             *cli_options, *args], capture_output=True, timeout=timeout)
    return result.stdout


def _wait_port(port: int, process: subprocess.Popen, log_path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}: {_read(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout} s: {_read(log_path)}")


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-3000:]
    except OSError:
        return ""


class RedisServer:
    def __init__(self, replica_of: "RedisServer | None" = None, port: int | None = None, persist: bool = False,
                 tls: tuple[str, str] | None = None, password: str = ""):
        """`persist`: an append-only file, so a restart keeps the data (what a site runs); `tls`: (certificate,
        key): TLS only, on `port`; `password`: AUTH required."""
        require("redis-cli")  # the tests read what is stored with it
        self.persist = persist
        self.tls = tls
        self.password = password
        self.program = require("redis-server")
        self.dir = tempfile.mkdtemp(prefix="redis-")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.socket = os.path.join(self.dir, "redis.sock")
        self.replica_of = replica_of
        self.log_path = os.path.join(self.dir, "redis.log")
        self.process = None

    def start(self) -> "RedisServer":
        args = [self.program, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--unixsocket", self.socket, "--unixsocketperm", "700",
                "--save", "", "--appendonly", "yes" if self.persist else "no", "--logfile", self.log_path, "--daemonize", "no"]
        if self.replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        if self.tls:
            args[1:3] = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls[0],
                         "--tls-key-file", self.tls[1], "--tls-ca-cert-file", self.tls[0], "--tls-auth-clients", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait_port(self.port, self.process, self.log_path)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        end_process(self.process, grace=5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def command(self, *args: str) -> bytes:
        options = ("--tls", "--cacert", self.tls[0]) if self.tls else ()
        if self.password:
            options += ("--no-auth-warning", "-a", self.password)
        return redis_command(self.port, *args, cli_options=options)

    def wait_synced(self, timeout: float = 10.0) -> None:
        """A replica: until its link to the primary is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"master_link_status:up" in self.command("INFO", "replication"):
                return
            time.sleep(0.1)
        raise AssertionError(f"replica on {self.port} did not sync: {_read(self.log_path)}")


class Sentinels:
    def __init__(self, primary: RedisServer, count: int = 3):
        self.program = require("redis-sentinel")
        self.primary = primary
        self.dir = tempfile.mkdtemp(prefix="sentinel-")
        self.ports = [free_port() for _ in range(count)]
        self.processes = []

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]

    def start(self) -> "Sentinels":
        quorum = len(self.ports) // 2 + 1
        for n, port in enumerate(self.ports):
            conf = os.path.join(self.dir, f"sentinel{n}.conf")
            with open(conf, "w") as f:
                f.write(f"port {port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile {self.dir}/sentinel{n}.log\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} {quorum}\n"
                        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                        f"sentinel failover-timeout {SERVICE} 5000\n")
            process = subprocess.Popen([self.program, conf], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            self.processes.append(process)
            _wait_port(port, process, f"{self.dir}/sentinel{n}.log")
        return self

    def primary_port(self) -> int | None:
        reply = redis_command(self.ports[0], "SENTINEL", "get-master-addr-by-name", SERVICE).split()
        return int(reply[1]) if len(reply) == 2 else None

    def cleanup(self) -> None:
        for process in self.processes:
            end_process(process, grace=5)
        shutil.rmtree(self.dir, ignore_errors=True)
