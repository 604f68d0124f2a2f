"""A job every N seconds on the injected clock: the binding sweeper, the phone keepalive, the gateway probes."""

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall


class Every:
    def __init__(self, clock: IReactorTime, interval: float, job):
        self.clock = clock
        self.interval = interval
        self._loop = LoopingCall(job)
        self._loop.clock = clock

    def start(self) -> None:
        """First run one interval from now (never at start-up, when nothing is there yet)."""
        if not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
