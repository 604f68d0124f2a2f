"""The primary's side of the workers: start them, restart one that dies, stop them with the server.

A worker runs proxy/workers/child.py in the same interpreter with the
primary's module path (so both run the same code, whatever the working
directory holds), and is given by file descriptor its own UDP sockets and its
bus sockets. Its UDP sockets are bound by the primary to the primary's
address and port with SO_REUSEPORT: the kernel gives each peer address to
one socket, so what one peer sends is read in the order it was sent (an ACK
never overtakes its BYE in a hand-over), and the sockets outlive a worker
that is restarted;
its stdin is a pipe from the primary, so a primary that dies takes its
workers with it. A worker logs JSON events to its stderr, and they are
logged here again with `[worker N]` in front, at their own level, so the
one log (twistd's) has everything.

A worker counts as alive once it says it is ready; the supervisor then tells
every process who is alive (nothing is handed to a worker that is not). One
that exits is restarted after `restart_delay`, doubled up to a minute while
it keeps dying within 10 s of its start.
"""

import json
import os
import signal
import socket
import sys

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger, LogLevel, eventFromJSON, globalLogPublisher

log = Logger()

_RECORD_SEPARATOR = b"\x1e"
# The worker's main program, on the primary's module path (the first argument).
_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv.pop(1)); "
         "from proxy.workers.child import main; sys.exit(main())")


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: "WorkerSupervisor", index: int):
        self.supervisor = supervisor
        self.index = index
        self._pending = b""
        self.ended = defer.Deferred()

    def errReceived(self, data: bytes):
        self._pending += data
        *records, self._pending = self._pending.split(_RECORD_SEPARATOR)
        if self._pending.endswith(b"\n"):
            # A record is its separator, JSON and a newline: one that has its newline is whole. Waiting for the
            # next separator instead held a worker's latest line back until it logged again.
            records.append(self._pending)
            self._pending = b""
        for record in records:
            self._relay(record.strip())

    def outReceived(self, data: bytes):
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.info("[worker {index}] {line}", index=self.index, line=line)

    def _relay(self, record: bytes) -> None:
        if not record:
            return
        try:
            event = eventFromJSON(record.decode("utf-8", "replace"))
        except (ValueError, KeyError, TypeError):
            for line in record.decode("utf-8", "replace").splitlines():  # not ours: an interpreter's last words
                log.error("[worker {index}] {line}", index=self.index, line=line)
            return
        event.setdefault("log_level", LogLevel.info)
        where = event.get("log_system")
        if not where or where == "-":
            where = f"{event.get('log_namespace', '?')}#{event['log_level'].name}"
        event["log_system"] = f"worker {self.index}: {where}"
        globalLogPublisher(event)

    def processEnded(self, reason):
        if self._pending.strip():
            self._relay(self._pending.strip())
        self.supervisor.ended(self.index, reason)
        self.ended.callback(None)


class WorkerSupervisor(service.Service):
    """Runs workers 1..count-1 beside the primary (worker 0, this process)."""

    def __init__(self, reactor, link, pairs, udp_listeners, *, config_path: str | None, restart_delay: float = 1.0,
                 start_timeout: float = 10.0):
        self.reactor = reactor
        self.link = link
        self.count = link.count
        self.pairs = pairs
        self.udp_listeners = udp_listeners  # proxy.service.UdpListener services, started before this one
        self.config_path = config_path
        self.restart_delay = restart_delay
        self.start_timeout = start_timeout
        self._paused = None  # the call that resumes reading if the workers are slow to start
        self.processes: dict[int, object] = {}
        self.sockets: dict[int, list[socket.socket]] = {}  # per worker, its UDP sockets (bound at start)
        self.ready: set[int] = set()
        self._protocols: dict[int, _WorkerProcess] = {}
        self._started_at: dict[int, float] = {}
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, object] = {}
        self.restarts = 0
        self.all_stopped = defer.succeed(None)  # fires once every worker has exited after stopService
        link.bus.on("ready", self._ready)

    # -- lifecycle --------------------------------------------------------------

    def startService(self):
        super().startService()
        self._bind_worker_sockets()
        # The primary reads nothing until the workers are ready (the kernel queues it): a Call-ID served here
        # while its worker starts would move there mid-transaction, and its nonce with it.
        for listener in self.udp_listeners:
            listener.port.stopReading()
        self._paused = self.reactor.callLater(self.start_timeout, self._resume, "not every worker was ready "
                                              f"within {self.start_timeout:.0f} s")
        for index in range(1, self.count):
            self._spawn(index)
        log.info("Running {count} processes (the primary and {workers} workers): [server] workers",
                 count=self.count, workers=self.count - 1)

    def stopService(self):
        super().stopService()
        if self._paused is not None and self._paused.active():
            self._paused.cancel()
        self._paused = None
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        waits = []
        for index, process in list(self.processes.items()):
            waits.append(self._protocols[index].ended)
            try:
                process.signalProcess("TERM")
            except Exception:  # already gone
                pass
        if not waits:
            self.all_stopped = defer.succeed(None)
            return None
        done = defer.DeferredList(waits)
        timeout = self.reactor.callLater(5, self._kill_remaining)
        done.addBoth(lambda _: timeout.active() and timeout.cancel())
        self.all_stopped = done
        return None

    def _bind_worker_sockets(self) -> None:
        """Per worker, one socket beside each of the primary's UDP ports (same address and port)."""
        for index in range(1, self.count):
            socks = []
            for listener in self.udp_listeners:
                own = listener.port.socket
                sock = socket.socket(own.family, socket.SOCK_DGRAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.setblocking(False)
                sock.bind(own.getsockname()[:2])
                socks.append(sock)
            self.sockets[index] = socks

    def _kill_remaining(self) -> None:
        for index, process in list(self.processes.items()):
            log.warn("Worker {index} did not stop within 5 s: killing it", index=index)
            try:
                process.signalProcess("KILL")
            except Exception:
                pass

    def signal_all(self, signum: int = signal.SIGHUP) -> None:
        """Pass a signal to every worker (SIGHUP: reload the config, as the primary does)."""
        for process in self.processes.values():
            try:
                process.signalProcess(signum)
            except Exception:
                pass

    # -- one worker -------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        child_fds: dict[int, object] = {0: "w", 1: "r", 2: "r"}
        next_fd = 3
        udp = []
        for sock in self.sockets[index]:
            child_fds[next_fd] = sock.fileno()
            udp.append(f"{next_fd}:{sock.family.value}")
            next_fd += 1
        child_fds[next_fd] = self.pairs[index][1].fileno()
        inbox = next_fd
        next_fd += 1
        outboxes = []
        for other in range(self.count):
            if other != index:
                child_fds[next_fd] = self.pairs[other][0].fileno()
                outboxes.append(f"{other}:{next_fd}")
                next_fd += 1
        args = [sys.executable, "-c", _BOOT, json.dumps(sys.path), "--index", str(index), "--count", str(self.count),
                "--udp", ",".join(udp), "--inbox", str(inbox), "--outboxes", ",".join(outboxes)]
        if self.config_path:
            args += ["--config", self.config_path]
        if self.link.core.plugins.listening:  # the primary's plugins hear events: the workers pass theirs on
            args.append("--events")
        process_protocol = _WorkerProcess(self, index)
        self._protocols[index] = process_protocol
        self._started_at[index] = self.reactor.seconds()
        self.processes[index] = self.reactor.spawnProcess(process_protocol, sys.executable, args, env=dict(os.environ),
                                                          path=os.getcwd(), childFDs=child_fds)

    def _ready(self, pid, sender) -> None:
        log.info("Worker {index} ready (pid {pid})", index=sender, pid=pid)
        self.ready.add(sender)
        self._broadcast_alive()
        self.link.welcome(sender)
        if len(self.ready) == self.count - 1:
            self._resume()

    def _resume(self, why: str = "") -> None:
        call, self._paused = self._paused, None
        if call is None:
            return
        if call.active():
            call.cancel()
        if why:
            log.warn("Serving SIP although {why}", why=why)
        for listener in self.udp_listeners:
            if listener.port is not None:
                listener.port.startReading()

    def _broadcast_alive(self) -> None:
        alive = [0] + sorted(self.ready)
        self.link.alive = set(alive)
        self.link.bus.broadcast("alive", alive)

    def ended(self, index: int, reason) -> None:
        self.processes.pop(index, None)
        self.ready.discard(index)
        self.link.forget_counters(index)
        self._broadcast_alive()
        if not self.running:
            return
        self.restarts += 1
        lived = self.reactor.seconds() - self._started_at.get(index, 0)
        delay = self._delays.get(index, self.restart_delay)
        delay = min(60.0, delay * 2) if lived < 10 else self.restart_delay
        self._delays[index] = delay
        code = getattr(reason.value, "exitCode", None)
        how = f"exit code {code}" if code is not None else f"signal {getattr(reason.value, 'signal', '?')}"
        log.error("Worker {index} ended ({how}); restarting it in {delay:.0f} s", index=index, how=how, delay=delay)
        self._restarts[index] = self.reactor.callLater(delay, self._spawn, index)

    def status(self) -> list[dict]:
        """For the admin API: each process, its pid, whether it runs."""
        rows = [{"worker": 0, "pid": os.getpid(), "running": True, "role": "primary"}]
        for index in range(1, self.count):
            process = self.processes.get(index)
            rows.append({"worker": index, "pid": getattr(process, "pid", None), "running": index in self.ready,
                         "role": "worker"})
        return rows
