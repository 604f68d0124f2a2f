"""What each phone asked the TFTP server for, and what that says about it.

A phone names itself in the files it asks for (CTLSEP<mac>.tlv, SEP<mac>.cnf.xml, SIP<mac>.cnf,
MGC<mac>.cnf: seed 002 line 100); from then on its address stands for it, so the shared files it fetches
(OS79XX.TXT, SIPDefault.cnf, the images) are put on its record too. Each phone keeps its last `per_phone`
requests; the table of phones is bounded as well.

`diagnose` turns a record into advice:
- the same CTLSEP<mac>.tlv or SEP<mac>.cnf.xml asked for again and again: the loader loops (seed 003);
- an image file (.bin, .sbn, .loads, .sb2) the phone asked for is not in the TFTP root (seed 002 line 261:
  "Protocol Application Invalid" follows);
- its SIP<mac>.cnf was sent but no registration came from it afterwards.
"""

import re
import time
from collections import deque

import attrs

from proxy.bounded import BoundedDict

_MAC_FILE = re.compile(r"(?:CTLSEP|SEP|SIP|MGC)([0-9A-Fa-f]{12})\.(?:tlv|cnf\.xml|cnf)\Z")
IMAGE_SUFFIXES = (".bin", ".sbn", ".loads", ".sb2")
LOOP_COUNT = 6  # the same security or SCCP file this often ...
LOOP_WINDOW = 60.0  # ... within this many seconds: a loop
REGISTER_GRACE = 120.0  # seconds after its config a phone should have registered


@attrs.define
class Request:
    at: float
    address: str
    name: str
    result: str  # sending, sent, not found, refused: ..., timeout, error: ...
    bytes: int = 0

    def as_json(self) -> dict:
        return attrs.asdict(self)


def mac_in(name: str) -> str | None:
    match = _MAC_FILE.search(name.rsplit("/", 1)[-1])
    return match.group(1).upper() if match else None


class RequestLog:
    def __init__(self, clock, per_phone: int = 200, max_phones: int = 10_000):
        self.clock = clock
        self.per_phone = per_phone
        self.phones: BoundedDict = BoundedDict(max_phones)  # "SEP<MAC>" or an address -> deque of Request
        self.macs: BoundedDict = BoundedDict(max_phones)  # address -> "SEP<MAC>"

    def seen(self, address: str, name: str, result: str) -> Request:
        mac = mac_in(name)
        if mac is not None:
            self.macs[address] = f"SEP{mac}"
            self._adopt(address, f"SEP{mac}")
        key = self.macs.get(address, address)
        entry = Request(at=self.clock.seconds(), address=address, name=name, result=result)
        log_ = self.phones.get(key)
        if log_ is None:
            log_ = deque(maxlen=self.per_phone)
        log_.append(entry)
        self.phones[key] = log_
        return entry

    def done(self, entry: Request | None, result: str, sent: int) -> None:
        if entry is not None:
            entry.result = result
            entry.bytes = sent

    def _adopt(self, address: str, device: str) -> None:
        """What this address asked for before it named itself is the phone's too."""
        earlier = self.phones.pop(address, None)
        if earlier:
            mine = self.phones.get(device) or deque(maxlen=self.per_phone)
            for entry in earlier:
                mine.append(entry)
            self.phones[device] = deque(sorted(mine, key=lambda e: e.at), maxlen=self.per_phone)

    def records(self, device: str | None = None) -> dict[str, list[Request]]:
        if device is not None:
            key = device.upper() if device.upper().startswith("SEP") else device
            return {key: list(self.phones.get(key, ()))}
        return {key: list(entries) for key, entries in self.phones.items()}


def diagnose(device: str, requests: list[Request], registered_since, now: float | None = None) -> list[str]:
    """Advice for one phone; `registered_since(address, t)` says whether it registered at or after t."""
    now = time.time() if now is None else now
    findings = []
    mac = device[3:] if device.startswith("SEP") else ""
    for loop_file, advice in (
            (f"CTLSEP{mac}.tlv", "the loader is looping on its certificate trust list (seed 003): put an empty "
                                 "CTLSEP{mac}.tlv in the TFTP root; if it keeps fetching the empty file, remove it "
                                 "again after a minute"),
            (f"SEP{mac}.cnf.xml", "the loader is looping on its SCCP configuration (seed 003): SEP{mac}.cnf.xml must "
                                  "carry the loadInformation for its model (sipproxy-admin phone add writes it); an "
                                  "empty one ends in 'Protocol Application Invalid'")):
        if not mac:
            continue
        times = [r.at for r in requests if r.name.rsplit("/", 1)[-1].upper() == loop_file.upper()]
        recent = [t for t in times if times and t > times[-1] - LOOP_WINDOW]
        if len(recent) >= LOOP_COUNT:
            findings.append(f"{device} has asked for {loop_file} {len(recent)} times in "
                            f"{recent[-1] - recent[0]:.0f} s: " + advice.format(mac=mac))
    missing = sorted({r.name for r in requests if r.name.lower().endswith(IMAGE_SUFFIXES) and r.result == "not found"})
    for name in missing:
        findings.append(f"{device} asked for the image file {name}, which is not in the TFTP root: unzip the whole "
                        "image package there (seed 002, Procedure D), or the phone ends in 'Protocol Application "
                        "Invalid'")
    configs = [r for r in requests if r.result == "sent" and r.name.rsplit("/", 1)[-1].upper().startswith("SIP")
               and r.name.lower().endswith(".cnf") and mac_in(r.name)]
    if configs:
        last = configs[-1]
        if now - last.at > REGISTER_GRACE and not registered_since(last.address, last.at):
            findings.append(f"{device} fetched {last.name} at {time.strftime('%H:%M:%S', time.localtime(last.at))} "
                            f"but has not registered since: check proxy1_address and its lines' names and "
                            "passwords (sipproxy-admin phone show)")
    return findings
