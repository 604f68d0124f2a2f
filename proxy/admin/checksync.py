"""Remote reboot and dial-plan push: syncinfo.xml and the check-sync NOTIFY (seed 001 line 2609).

The phone, on a NOTIFY with `Event: check-sync`, waits until it has been idle
for 20 seconds, fetches syncinfo.xml from its TFTP server, and reboots only
when the SYNC of the entry for its image (or the `*` entry) differs from the
one it stored. So a reboot:

1. writes new SYNC values into syncinfo.xml in the TFTP root (atomically:
   temporary file, fsync, rename), a `<IMAGE VERSION="*" SYNC="..."/>` entry
   added when missing. A fleet reboot (`--all`) bumps every entry; a partial
   one only what the chosen phones read: their images' entries, and `*` when
   one of them has no entry of its own. Any other phone reading a bumped
   entry reboots on its next check-sync too, and `--dry-run` says which;
2. sends one NOTIFY per phone (not per line) to its registered contact, with
   the NAT rules of its binding, as a client transaction with
   retransmissions, in the seed's message shape;
3. paces the NOTIFYs (default 1 per second), so hundreds of phones do not
   come back in one registration storm;
4. reports per phone: accepted (2xx), refused (code), no answer, not
   registered; with `wait`, also when each phone has registered again (a new
   registration after its NOTIFY) and with which firmware.

A dial-plan push sends the same NOTIFY without touching syncinfo.xml: the
phone fetches dialplan.xml and, SYNC unchanged, does not reboot.
"""

import email.utils
import itertools
import os
import re
import secrets
import xml.etree.ElementTree as ET

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.admin.inventory import Phone, image_name, parse_user_agent
from proxy.registration.location import Binding, ILocationService
from proxy.nat import NatPolicy
from proxy.sip.headers import Headers
from proxy.sip.message import Request, Response
from proxy.sip.uri import SipUri
from proxy.statedir import replace_file
from proxy.transaction import MAGIC_COOKIE, TransactionLayer

log = Logger()

SYNCINFO = "syncinfo.xml"
_SYNC_MAX = 32  # "a character string of up to 32 characters" (seed 001 line 2629)


class SyncInfoError(Exception):
    """syncinfo.xml cannot be read or written; the message says which and why."""


def next_sync(value: str) -> str:
    """A SYNC value different from `value`: numbers count up, anything else gets a fresh token."""
    if value.isascii() and value.isdigit() and len(str(int(value) + 1)) <= _SYNC_MAX:
        return str(int(value) + 1)
    return secrets.token_hex(4)


def bump_syncinfo(tftp_root: str, images: set[str] | None = None, *,
                  write: bool = True) -> list[tuple[str, str, str]]:
    """New SYNC values in <tftp_root>/syncinfo.xml; returns (version, old, new) for each entry changed.

    `images` None (a fleet reboot): every entry. Otherwise only what the targeted phones read: the entry of
    each one's image, and `*` when one of them has no entry of its own (or its image is unknown). Any other
    phone reading a bumped entry reboots on its next check-sync too; `--dry-run` shows which entries.
    `write=False` only computes (the dry run).
    """
    path = os.path.join(tftp_root, SYNCINFO)
    entries: list[tuple[str, str]] = []
    try:
        with open(path, "rb") as f:
            text = f.read().decode("latin-1")
    except FileNotFoundError:
        text = ""
    except OSError as e:
        raise SyncInfoError(f"{path}: cannot read: {e.strerror}") from None
    if text.strip():
        # The phones' parser is lenient and so are the files admins write: read IMAGE elements
        # wherever they are, with or without a root element.
        try:
            root = ET.fromstring(f"<root>{_strip_declaration(text)}</root>")
        except ET.ParseError as e:
            raise SyncInfoError(f"{path}: not readable XML ({e}); fix or remove it") from None
        for element in root.iter():
            if element.tag.upper() == "IMAGE":
                attrs_ci = {k.upper(): v for k, v in element.attrib.items()}
                entries.append((attrs_ci.get("VERSION", "*"), attrs_ci.get("SYNC", "1")))
    if not any(version == "*" for version, _ in entries):
        entries.append(("*", "1"))
    if images is None:
        chosen = {version for version, _ in entries}
    else:
        listed = {version for version, _ in entries}
        chosen = {image for image in images if image in listed}
        if any(not image or image not in listed for image in images):
            chosen.add("*")
    updated = [(version, old, next_sync(old) if version in chosen else old) for version, old in entries]
    if write:
        body = "".join(f'<IMAGE VERSION="{_xml_attr(v)}" SYNC="{_xml_attr(new)}"/>\n' for v, _, new in updated)
        _atomic_write(path, body.encode("latin-1"))
    return [(version, old, new) for version, old, new in updated if version in chosen]


def _strip_declaration(text: str) -> str:
    return re.sub(r"^\s*<\?xml[^>]*\?>", "", text)


def _xml_attr(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def _atomic_write(path: str, data: bytes) -> None:
    try:
        replace_file(path, data, mode=0o644)  # the TFTP server must read it
    except OSError as e:
        raise SyncInfoError(f"{path}: cannot write: {e.strerror}") from None


@attrs.define
class PhoneResult:
    device: str
    lines: tuple[str, ...]
    address: str
    firmware_before: str
    state: str = "pending"  # pending, sent, accepted, refused, no_answer, not_registered
    status: int | None = None
    reason: str = ""
    sent_at: float | None = None
    back_at: float | None = None
    firmware_after: str = ""
    outcome: str = ""  # with wait: rebooted, same_firmware, not_back

    def as_json(self) -> dict:
        return attrs.asdict(self)


class RebootJob:
    """One reboot (or dial-plan push) of a set of phones, paced, followed to the end."""

    def __init__(self, job_id: int, service: "CheckSync", phones: list[Phone], missing: list[str], *, rate: float,
                 reboot: bool, wait: bool, wait_timeout: float, sync_changes):
        self.id = job_id
        self.service = service
        self.clock = service.clock
        self.phones = {p.device: p for p in phones}
        self.kind = "reboot" if reboot else "push-dialplan"
        self.rate = rate
        self.wait = wait
        self.wait_timeout = wait_timeout
        self.sync_changes = sync_changes
        self.results: dict[str, PhoneResult] = {}
        for p in phones:
            self.results[p.device] = PhoneResult(device=p.device, lines=p.lines, address=f"{p.host}:{p.port}",
                                                 firmware_before=p.firmware)
        for line in missing:
            self.results[line] = PhoneResult(device=line, lines=(line,), address="", firmware_before="",
                                             state="not_registered")
        self.started_at = self.clock.seconds()
        self.queue = list(self.phones)
        self.timers = []

    @property
    def done(self) -> bool:
        for r in self.results.values():
            if r.state in ("pending", "sent"):
                return False
            if self.wait and r.state == "accepted" and not r.outcome:
                return False
        return True

    def start(self) -> None:
        """The first NOTIFY now, the others one interval apart."""
        interval = 1.0 / self.rate
        for i, device in enumerate(self.queue):
            if i == 0:
                self._send(device)
            else:
                self.timers.append(self.clock.callLater(i * interval, self._send, device))

    def _send(self, device: str) -> None:
        phone = self.phones[device]
        binding = phone.notify_binding()
        result = self.results[device]
        result.state = "sent"
        result.sent_at = self.clock.seconds()
        self.service.send_notify(binding, lambda response: self._answered(device, response),
                                 lambda: self._no_answer(device))

    def _answered(self, device: str, response: Response) -> None:
        result = self.results[device]
        if response.status < 200 or result.state != "sent":
            return
        result.status = response.status
        result.reason = response.reason
        result.state = "accepted" if response.status < 300 else "refused"
        log.info("check-sync NOTIFY to {device}: {status} {reason}", device=device, status=response.status,
                 reason=response.reason)
        self.service.counted(result.state)
        if result.state == "accepted" and self.wait:
            self.timers.append(self.clock.callLater(self.wait_timeout, self._not_back, device))
        self._maybe_finished()

    def _no_answer(self, device: str) -> None:
        result = self.results[device]
        if result.state == "sent":
            result.state = "no_answer"
            log.info("check-sync NOTIFY to {device}: no answer", device=device)
            self.service.counted("no_answer")
        self._maybe_finished()

    def _not_back(self, device: str) -> None:
        result = self.results[device]
        if not result.outcome:
            result.outcome = "not_back"
        self._maybe_finished()

    def registered(self, binding: Binding) -> None:
        """A registration came in: is it one of our phones coming back after its NOTIFY?"""
        if not self.wait:
            return
        for device, phone in self.phones.items():
            result = self.results[device]
            if result.state != "accepted" or result.outcome or result.sent_at is None:
                continue
            if binding.aor in phone.lines and binding.registered_at >= result.sent_at and self._is_new(phone, binding):
                result.back_at = self.clock.seconds()
                result.firmware_after = parse_user_agent(binding.user_agent)[1] or binding.user_agent
                same = result.firmware_after == result.firmware_before
                result.outcome = "same_firmware" if same else "rebooted"
                log.info("{device} is back with {firmware}", device=device, firmware=binding.user_agent)
        self._maybe_finished()

    @staticmethod
    def _is_new(phone: Phone, binding: Binding) -> bool:
        """A registration from a new boot: a Call-ID this phone did not use before."""
        return all(b.call_id != binding.call_id for b in phone.bindings)

    def _maybe_finished(self) -> None:
        if self.done:
            self.service.job_finished(self)

    def as_json(self) -> dict:
        counts: dict[str, int] = {}
        for r in self.results.values():
            counts[r.outcome or r.state] = counts.get(r.outcome or r.state, 0) + 1
        return {
            "id": self.id, "kind": self.kind, "done": self.done, "wait": self.wait, "rate": self.rate,
            "started_at": self.started_at, "summary": counts,
            "syncinfo": [{"version": v, "old": o, "new": n} for v, o, n in self.sync_changes],
            "phones": [r.as_json() for r in self.results.values()],
        }


class JobConflict(Exception):
    """Some of the phones are in a running job already."""


class CheckSync:
    """Builds and runs reboot / push jobs; the admin API calls it."""

    def __init__(self, clock: IReactorTime, transactions: TransactionLayer, location: ILocationService, *,
                 advertise: tuple[str, int], tftp_root: str = "", nat: NatPolicy = NatPolicy(),
                 from_user: str = "webadmin", via=None):
        self.clock = clock
        # via(transport, branch): our Via (Identity.via_value, which names the worker that waits for the answer)
        self.via = via or (lambda transport, branch: f"SIP/2.0/{transport} {self.advertise_host}:"
                                                     f"{self.advertise_port};branch={branch}")
        self.transactions = transactions
        self.location = location
        self.advertise_host, self.advertise_port = advertise
        self.tftp_root = tftp_root
        self.nat = nat
        self.from_user = from_user
        self.jobs: dict[int, RebootJob] = {}
        self._ids = itertools.count(1)
        self._cseq = itertools.count(1)
        self.notifies: dict[str, int] = {}
        location.add_observer(self._location_event)

    def counted(self, result: str) -> None:
        self.notifies[result] = self.notifies.get(result, 0) + 1

    def _location_event(self, event: str, binding: Binding) -> None:
        if event in ("added", "refreshed"):
            for job in list(self.jobs.values()):
                if not job.done:
                    job.registered(binding)

    def running_device(self, device: str) -> RebootJob | None:
        for job in self.jobs.values():
            if not job.done and device in job.phones:
                return job
        return None

    def sync_images(self, phones: list[Phone], everyone: bool) -> set[str] | None:
        """The syncinfo.xml entries a reboot of these phones must bump (None: all of them)."""
        return None if everyone else {image_name(p.firmware) for p in phones}

    def start(self, phones: list[Phone], missing: list[str], *, reboot: bool, rate: float = 1.0, wait: bool = False,
              wait_timeout: float = 600.0, everyone: bool = True) -> RebootJob:
        for phone in phones:
            job = self.running_device(phone.device)
            if job is not None:
                raise JobConflict(f"{phone.device} is in running job {job.id} ({job.kind}); wait for it to finish")
        changes = []
        if reboot:
            if not self.tftp_root:
                raise SyncInfoError("checksync.tftp_root is not set: without a new SYNC in syncinfo.xml the phones "
                                    "would not reboot (use push-dialplan to only make them check)")
            changes = bump_syncinfo(self.tftp_root, self.sync_images(phones, everyone))
            log.info("syncinfo.xml: {changes}", changes=", ".join(f"{v}: {o} -> {n}" for v, o, n in changes))
        job = RebootJob(next(self._ids), self, phones, missing, rate=rate, reboot=reboot, wait=wait,
                        wait_timeout=wait_timeout, sync_changes=changes)
        self.jobs[job.id] = job
        log.info("{kind} job {id}: {count} phone(s) at {rate}/s", kind=job.kind, id=job.id, count=len(phones),
                 rate=rate)
        job.start()
        job._maybe_finished()
        return job

    def job_finished(self, job: RebootJob) -> None:
        for timer in job.timers:
            if timer.active():
                timer.cancel()
        # Keep the last jobs for the admin to read; forget older ones.
        for old in sorted(self.jobs)[:-20]:
            if self.jobs[old].done:
                del self.jobs[old]

    def build_notify(self, binding: Binding) -> Request:
        """The seed's sample NOTIFY (001 line 2636), to the phone's registered contact."""
        contact = SipUri.parse(binding.contact)
        line = contact.user or binding.aor.partition(":")[2].partition("@")[0]
        me = f"{self.advertise_host}:{self.advertise_port}"
        branch = MAGIC_COOKIE + secrets.token_hex(8)
        headers = Headers.of(
            ("Via", self.via(binding.transport, branch)),
            ("Max-Forwards", "70"),
            ("From", f"<sip:{self.from_user}@{self.advertise_host}>;tag={secrets.token_hex(5)}"),
            ("To", f"<sip:{line}@{contact.host}>"),
            ("Event", "check-sync"),
            ("Date", email.utils.formatdate(self.clock.seconds(), usegmt=True)),
            ("Call-ID", f"{secrets.token_hex(8)}@{self.advertise_host}"),
            ("CSeq", f"{next(self._cseq)} NOTIFY"),
            ("Contact", f"<sip:{self.from_user}@{me}>"),
        )
        return Request("NOTIFY", str(contact), headers)

    def send_notify(self, binding: Binding, on_response, on_timeout) -> None:
        contact = SipUri.parse(binding.contact)
        destination = binding.destination(contact.host, contact.port, self.nat)
        self.transactions.start_client(self.build_notify(binding), destination, on_response, on_timeout)
