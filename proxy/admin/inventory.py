"""The phones the server knows, from their registrations: one row per device.

A device is identified by its `+sip.instance` (8.x firmware puts the MAC
there) or else by the address and port its REGISTERs come from: a
7940/7960 registers all its lines (up to six) from one socket.

Firmware comes from User-Agent: "Cisco-SIPIPPhone/7.5" (7940/7960 SIP
firmware before 8.x) or "Cisco-CP7960G/8.0" (8.x, which also names the
model). Filters: `firmware` is a glob matched against the version ("7.5")
and the image name it implies ("P0S3-07-5-00", seed 002 line 65); `where`
compares versions: "firmware<8.0", "firmware>=7.4", "model=7940".
"""

import fnmatch
import re

import attrs

from proxy.registration.auth import mac_from_instance
from proxy.registration.location import Binding

_UA_RE = re.compile(r"Cisco-(?:CP(?P<model>79\d\dG?)|SIPIPPhone)/(?P<version>[0-9][0-9A-Za-z.()\-]*)")
_WHERE_RE = re.compile(r"\s*(firmware|model)\s*(<=|>=|==|!=|<|>|=)\s*(\S+)\s*\Z")


def parse_user_agent(user_agent: str) -> tuple[str, str]:
    """(model, version) from a Cisco User-Agent; '' where unknown."""
    m = _UA_RE.search(user_agent or "")
    if not m:
        return "", ""
    model = (m.group("model") or "").rstrip("G")
    return model, m.group("version")


def version_key(version: str) -> tuple:
    """Comparable parts: numbers as numbers; text sorts after them ("8.0(1)" > "8.0")."""
    return tuple((int(p), "") if p.isascii() and p.isdigit() else (-1, p) for p in re.split(r"[.\-()]+", version) if p)


def image_name(version: str) -> str:
    """The SIP image name a version implies: 7.5 -> P0S3-07-5-00 (seed 002 line 65)."""
    parts = [p for p in re.split(r"[.\-]", version) if p.isascii() and p.isdigit()]
    if len(parts) < 2:
        return ""
    sub = parts[2] if len(parts) > 2 else "0"
    return f"P0S3-{int(parts[0]):02d}-{int(parts[1])}-{int(sub):02d}"


@attrs.frozen
class Phone:
    device: str  # SEP<MAC> when known, else host:port
    mac: str
    host: str
    port: int
    transport: str
    lines: tuple[str, ...]  # AoRs, sorted
    user_agent: str
    model: str
    firmware: str
    last_registration: float
    bindings: tuple[Binding, ...] = attrs.field(eq=False, repr=False)

    def as_json(self) -> dict:
        return {
            "device": self.device, "mac": self.mac or None, "address": f"{self.host}:{self.port}",
            "transport": self.transport, "lines": list(self.lines), "user_agent": self.user_agent,
            "model": self.model or None, "firmware": self.firmware or None,
            "image": image_name(self.firmware) or None, "last_registration": self.last_registration,
        }

    def notify_binding(self) -> Binding:
        """The binding a check-sync NOTIFY goes to: the lowest line (one NOTIFY per phone)."""
        return sorted(self.bindings, key=lambda b: b.aor)[0]


def phones(bindings: list[Binding]) -> list[Phone]:
    groups: dict[str, list[Binding]] = {}
    for b in bindings:
        mac = mac_from_instance(b.instance) if b.instance else None
        key = f"SEP{mac}" if mac else (b.instance or f"{b.source_host}:{b.source_port}")
        groups.setdefault(key, []).append(b)
    out = []
    for key, group in groups.items():
        latest = max(group, key=lambda b: b.registered_at)
        model, version = parse_user_agent(latest.user_agent)
        mac = key[3:] if key.startswith("SEP") else ""
        out.append(Phone(
            device=key, mac=mac, host=latest.source_host, port=latest.source_port, transport=latest.transport,
            lines=tuple(sorted({b.aor for b in group})), user_agent=latest.user_agent, model=model,
            firmware=version, last_registration=latest.registered_at, bindings=tuple(group),
        ))
    out.sort(key=lambda p: p.lines)
    return out


class FilterError(ValueError):
    """A filter expression that cannot be understood."""


def matches(phone: Phone, *, firmware: str | None = None, model: str | None = None, where: str | None = None) -> bool:
    if firmware and not (fnmatch.fnmatchcase(phone.firmware, firmware)
                         or fnmatch.fnmatchcase(image_name(phone.firmware), firmware)
                         or fnmatch.fnmatchcase(phone.user_agent, firmware)):
        return False
    if model and phone.model != model.upper().removeprefix("CP").rstrip("G"):
        return False
    if where:
        m = _WHERE_RE.match(where)
        if not m:
            raise FilterError(f"cannot read {where!r}: use firmware<8.0, firmware>=7.4 or model=7940")
        field, op, value = m.groups()
        if field == "model":
            if op not in ("=", "==", "!="):
                raise FilterError("model compares with = or != only")
            return (phone.model == value) == (op != "!=")
        if not phone.firmware:
            return False
        mine, theirs = version_key(phone.firmware), version_key(value)
        return {"<": mine < theirs, "<=": mine <= theirs, ">": mine > theirs, ">=": mine >= theirs,
                "=": mine == theirs, "==": mine == theirs, "!=": mine != theirs}[op]
    return True


def select(all_phones: list[Phone], *, lines=(), devices=(), everyone=False, firmware=None, model=None, where=None,
           domain: str = "") -> tuple[list[Phone], list[str]]:
    """Phones chosen by line names, device names (SEP<MAC>, host:port), all, and filters; and the lines not found."""
    chosen: dict[str, Phone] = {}
    missing = []
    for line in lines:
        aor = line if line.startswith("sip:") else f"sip:{line}@{domain}"
        found = [p for p in all_phones if aor in p.lines]
        if not found:
            missing.append(line)
        for p in found:
            chosen[p.device] = p
    for device in devices:
        found = [p for p in all_phones if p.device.upper() == device.upper() or f"{p.host}:{p.port}" == device]
        if not found:
            missing.append(device)
        for p in found:
            chosen[p.device] = p
    if everyone or ((firmware or model or where) and not lines and not devices):
        for p in all_phones:
            chosen[p.device] = p
    picked = [p for p in chosen.values() if matches(p, firmware=firmware, model=model, where=where)]
    picked.sort(key=lambda p: p.lines)
    return picked, missing
