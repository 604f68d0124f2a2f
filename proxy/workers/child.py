"""A worker's main program, started only by the supervisor (proxy/workers/supervisor.py `_BOOT`).

It reads the same config file as the primary (the primary checked it, and
the state files, before it started), builds SIP on the sockets it was given
(proxy/service.py `build_worker_service`), says "ready" on the bus, and runs
until SIGTERM or until its stdin (a pipe from the primary) closes: a worker
never outlives its primary. SIGHUP reloads the config, as in the primary.
"""

import argparse
import os
import signal
import sys

from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer


def _parse(argv):
    parser = argparse.ArgumentParser(prog="proxy.workers.child")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--udp", default="", help="FD:FAMILY,... the primary's UDP sockets")
    parser.add_argument("--inbox", type=int, required=True)
    parser.add_argument("--outboxes", required=True, help="WORKER:FD,...")
    parser.add_argument("--config", default=None)
    parser.add_argument("--events", action="store_true", help="the primary's plugins hear events: pass ours on")
    return parser.parse_args(argv)


@implementer(IReadDescriptor)
class _PrimaryWatch:
    """Stops the reactor when stdin, the primary's pipe, reaches end of file."""

    def __init__(self, reactor):
        self.reactor = reactor

    def fileno(self):
        return 0

    def logPrefix(self):
        return "primary-watch"

    def doRead(self):
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self.reactor.removeReader(self)
            _stop(self.reactor)
        return None

    def connectionLost(self, reason):
        pass


def _stop(reactor) -> None:
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:  # already stopping (SIGTERM and the primary's pipe closing, both)
        pass


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stderr)], redirectStandardIO=False)
    from twisted.internet import reactor

    from proxy.config import load_config
    from proxy.plugin import resolve
    from proxy.service import build_worker_service

    config = load_config(args.config)
    plugins = resolve(config.plugins.enabled, config.plugins.tables, config.path)
    udp = [tuple(int(x) for x in item.split(":")) for item in args.udp.split(",") if item]
    outboxes = {int(k): int(fd) for k, fd in (item.split(":") for item in args.outboxes.split(",") if item)}
    top, _ = build_worker_service(config, reactor, plugins, index=args.index, count=args.count, udp_fds=udp,
                                     inbox_fd=args.inbox, outbox_fds=outboxes, events=args.events)

    def reload(signum, frame):
        reactor.callFromThread(top.reloader.reload)

    signal.signal(signal.SIGHUP, reload)
    signal.signal(signal.SIGTERM, lambda signum, frame: reactor.callFromThread(_stop, reactor))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the primary stops us
    os.set_blocking(0, False)
    reactor.addReader(_PrimaryWatch(reactor))
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run(installSignalHandlers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
