"""Calls as dialogs: what is in progress, in what state, and one call record when each ends.

The proxy stays transaction-stateful for routing; this table only watches what passes through it (it
record-routes, so every in-dialog request of a call reaches it, and with workers reaches the process that
owns the call's Call-ID):

    INVITE routed           -> ringing
    2xx to it               -> up (answered_at)
    the INVITE fails        -> a record: not answered, its final status
    re-INVITE with hold SDP -> on_hold (c=0.0.0.0, a=sendonly or a=inactive; seed 001 line 3378: B holds A
                               before a transfer); with active SDP -> up again
    REFER, or BYE with Also -> transferring (seed 001 lines 3378-3584: the blind transfer, and the Bye/Also
                               fallback after a 501)
    BYE                     -> a record: who hung up (the caller's From tag or the callee's), duration

A call whose BYE never passes (no Record-Route, a phone that lost power) is closed after `max_seconds` and
its record says so. Each record is a log line (written once a second, all the second's records in one log
event) and a `call_record` plugin event.
"""

import attrs
from twisted.logger import Logger

from proxy.periodic import Every
from proxy.sip.grammar import for_log

log = Logger()

STATES = ("ringing", "up", "on_hold", "transferring")
FLUSH_SECONDS = 1.0
FLUSH_LINES = 500
_HOLD = (b"a=sendonly", b"a=inactive", b"c=IN IP4 0.0.0.0")


@attrs.define
class Dialog:
    call_id: str
    caller: str  # the From URI
    callee: str  # the Request-URI as dialled
    caller_tag: str
    started_at: float
    state: str = "ringing"
    callee_tag: str = ""
    answered_at: float | None = None
    transfer: str = ""  # "refer" or "bye-also" once one was seen; "bye-also-completed" when the proxy did it
    transfer_to: str = ""
    caller_agent: str = ""  # User-Agent of the INVITE
    callee_agent: str = ""  # User-Agent (or Server) of the 2xx

    def as_json(self, now: float, worker: int | None) -> dict:
        return {"call_id": self.call_id, "caller": self.caller, "callee": self.callee, "state": self.state,
                "started_at": self.started_at, "answered_at": self.answered_at,
                "seconds": round(now - (self.answered_at or self.started_at), 1), "transfer": self.transfer or None,
                "transfer_to": self.transfer_to or None, "worker": worker}


@attrs.frozen
class CallRecord:
    call_id: str
    caller: str
    callee: str
    started_at: float
    answered_at: float | None
    ended_at: float
    ended_by: str  # caller, callee, timeout, transferee, transfer_target, failed; "" for a call never answered
    status: int  # the final status of the INVITE
    transfer: str = ""

    @property
    def duration(self) -> float:
        return round(self.ended_at - self.answered_at, 1) if self.answered_at else 0.0


def is_hold(body: bytes) -> bool:
    return any(marker in body for marker in _HOLD)


class DialogTable:
    def __init__(self, clock, *, max_seconds: float = 4 * 3600.0, on_record=None, worker: int | None = None):
        self.clock = clock
        self.max_seconds = max_seconds
        self.on_record = on_record  # on_record(CallRecord): the plugin event
        self.worker = worker
        self.dialogs: dict[str, Dialog] = {}
        self.records = 0
        self.timed_out = 0
        self._sweeper = Every(clock, 60.0, self.sweep)
        self._lines: list[str] = []  # call records not yet logged (flushed once a second)
        self._flusher = None

    def start(self) -> None:
        self._sweeper.start()

    def stop(self) -> None:
        self._sweeper.stop()
        self.flush()

    # -- from the router -------------------------------------------------------------

    def invite_routed(self, call_id: str, caller: str, callee: str, caller_tag: str, agent: str = "") -> None:
        if call_id not in self.dialogs:
            self.dialogs[call_id] = Dialog(call_id=call_id, caller=caller, callee=callee, caller_tag=caller_tag,
                                           started_at=self.clock.seconds(), caller_agent=agent)

    def answered(self, call_id: str, callee_tag: str, agent: str = "") -> None:
        dialog = self.dialogs.get(call_id)
        if dialog is not None and dialog.answered_at is None:
            dialog.answered_at = self.clock.seconds()
            dialog.callee_tag = callee_tag or ""
            dialog.callee_agent = agent
            dialog.state = "up"

    def agent_of_peer(self, call_id: str, from_tag: str | None) -> str:
        """The User-Agent of the party a request in this dialog goes to (the sender's peer)."""
        dialog = self.dialogs.get(call_id)
        if dialog is None:
            return ""
        return dialog.callee_agent if from_tag == dialog.caller_tag else dialog.caller_agent

    def take_over(self, call_id: str, target: str) -> Dialog | None:
        """A Bye/Also the proxy completes (proxy/transfer.py): the call goes on, to `target`."""
        dialog = self.dialogs.get(call_id)
        if dialog is not None:
            dialog.state, dialog.transfer, dialog.transfer_to = "transferring", "bye-also-completed", target
        return dialog

    def closed(self, dialog: Dialog, ended_by: str) -> None:
        """A call the proxy carried on (a completed transfer) has ended."""
        if self.dialogs.get(dialog.call_id) is dialog:
            del self.dialogs[dialog.call_id]
            self._record(dialog, ended_by=ended_by, status=200)

    def failed(self, call_id: str, status: int) -> None:
        """The INVITE ended without a 2xx: the call never was."""
        dialog = self.dialogs.get(call_id)
        if dialog is not None and dialog.answered_at is None:
            del self.dialogs[call_id]
            self._record(dialog, ended_by="", status=status)

    def in_dialog(self, method: str, call_id: str, from_tag: str | None, body: bytes, also: str | None,
                  refer_to: str | None) -> None:
        dialog = self.dialogs.get(call_id)
        if dialog is None:
            return
        if method == "BYE":
            if also:
                dialog.transfer, dialog.transfer_to = "bye-also", also
            del self.dialogs[call_id]
            by = "caller" if from_tag == dialog.caller_tag else "callee"
            self._record(dialog, ended_by=by, status=200)
        elif method == "INVITE" and body and dialog.state != "transferring":
            dialog.state = "on_hold" if is_hold(body) else "up"
        elif method == "REFER":
            dialog.state = "transferring"
            dialog.transfer, dialog.transfer_to = "refer", refer_to or ""

    def sweep(self) -> None:
        """Close what has gone on longer than max_seconds: its end never passed through us."""
        limit = self.clock.seconds() - self.max_seconds
        for call_id in [c for c, d in self.dialogs.items() if d.started_at < limit]:
            dialog = self.dialogs.pop(call_id)
            self.timed_out += 1
            self._record(dialog, ended_by="timeout", status=200 if dialog.answered_at else 408)

    # -- out -------------------------------------------------------------------------

    def _record(self, dialog: Dialog, ended_by: str, status: int) -> None:
        record = CallRecord(call_id=dialog.call_id, caller=dialog.caller, callee=dialog.callee,
                            started_at=dialog.started_at, answered_at=dialog.answered_at,
                            ended_at=self.clock.seconds(), ended_by=ended_by, status=status,
                            transfer=dialog.transfer)
        self.records += 1
        outcome = (f"hung up by the {ended_by.replace('_', ' ')}" if ended_by in (
            "caller", "callee", "transferee", "transfer_target") else
            "transfer failed" if ended_by == "failed" else
            "closed after max_call_seconds" if ended_by == "timeout" else f"not answered ({status})")
        self._lines.append(f"Call record: {for_log(record.caller)} -> {for_log(record.callee)}, {outcome}"
                           + (f", transferred ({record.transfer})" if record.transfer else "")
                           + f", {record.duration} s (Call-ID {for_log(record.call_id)})")
        if len(self._lines) >= FLUSH_LINES:
            self.flush()
        elif self._flusher is None or not self._flusher.active():
            self._flusher = self.clock.callLater(FLUSH_SECONDS, self.flush)
        if self.on_record is not None:
            self.on_record(record)

    def flush(self) -> None:
        """The call records of the last second, as one log event: a log event per call costs a B2 call rate
        a quarter (docs/performance.md); the file still gets one line per call."""
        if self._flusher is not None and self._flusher.active():
            self._flusher.cancel()
        self._flusher = None
        if self._lines:
            lines, self._lines = self._lines, []
            log.info("{records}", records="\n".join(lines), call_records=len(lines))

    def calls(self) -> list[dict]:
        now = self.clock.seconds()
        return [d.as_json(now, self.worker) for d in sorted(self.dialogs.values(), key=lambda d: d.started_at)]

    def counters(self) -> dict:
        by_state = dict.fromkeys(STATES, 0)
        for dialog in self.dialogs.values():
            by_state[dialog.state] += 1
        return {"calls_by_state": by_state, "call_records": self.records, "calls_timed_out": self.timed_out}
