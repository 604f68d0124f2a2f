"""The provisioned phones: `<state_dir>/phones.json` (mode 0600, replaced atomically under a lock).

One entry per phone, by its device name SEP<MAC> (the MAC in upper case, seed 001 line 1032): model,
lines (user names), label, and the image it must run when an upgrade wave has set one for it. The line
passwords are kept here for provisioning only (they go into SIP<MAC>.cnf, which the phone must read);
the users file keeps only their HA1, as for every user.
"""

import fcntl
import json
import os
import re
from contextlib import contextmanager

import attrs

from proxy.errors import CommandError
from proxy.statedir import replace_file

PHONES_FILE = "phones.json"
MODELS = ("7940", "7960")
MAX_LINES = {"7940": 2, "7960": 6}  # line buttons: lineN_* goes up to 6 (seed 001 Table 3-4), a 7940 has 2
_DEVICE = re.compile(r"(?:SEP|SIP)?([0-9A-Fa-f]{12})\Z")


class PhoneError(CommandError):
    """Printed by sipproxy-admin as is."""


def device_name(text: str) -> str:
    """SEP<MAC> from SEP003094C25D2E, 003094c25d2e, 00:30:94:C2:5D:2E or 00-30-94-c2-5d-2e."""
    compact = re.sub(r"[:.\-]", "", text.strip())
    match = _DEVICE.match(compact)
    if match is None:
        raise PhoneError(f"{text!r} is not a phone's MAC address (12 hex digits, or SEP followed by them)")
    return "SEP" + match.group(1).upper()


@attrs.frozen
class ProvisionedPhone:
    device: str  # SEP<MAC>
    model: str
    lines: tuple[str, ...]
    label: str = ""
    image: str = ""  # this phone's own image_version (an upgrade wave), else SIPDefault.cnf's
    passwords: dict = attrs.field(factory=dict, eq=False, repr=False)  # line -> password

    @property
    def mac(self) -> str:
        return self.device[3:]

    def as_json(self, with_passwords: bool = False) -> dict:
        out = {"device": self.device, "mac": self.mac, "model": self.model, "lines": list(self.lines),
               "label": self.label, "image": self.image or None}
        if with_passwords:
            out["passwords"] = dict(self.passwords)
        return out


def check_phone(phone: ProvisionedPhone) -> None:
    if phone.model not in MODELS:
        raise PhoneError(f"model {phone.model!r}: these files are for the 7940 and 7960 (--model 7940 or 7960)")
    if not phone.lines:
        raise PhoneError("a phone needs at least one line (--lines 1001[,1002...])")
    if len(phone.lines) > MAX_LINES[phone.model]:
        raise PhoneError(f"a {phone.model} has {MAX_LINES[phone.model]} lines, not {len(phone.lines)}")
    if len(phone.label) > 11:
        raise PhoneError("the label is at most 11 characters (phone_label, seed 001 Table 3-4)")
    if any(c in phone.label for c in "\"\r\n"):
        raise PhoneError("the label cannot hold quotes or line breaks")


def read_phones(path: str) -> dict[str, ProvisionedPhone]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise PhoneError(f"{path}: cannot read the phones: {e}") from None
    out = {}
    try:
        for device, entry in data["phones"].items():
            out[device] = ProvisionedPhone(device=device, model=entry["model"], lines=tuple(entry["lines"]),
                                           label=entry.get("label", ""), image=entry.get("image", ""),
                                           passwords=dict(entry.get("passwords", {})))
    except (KeyError, TypeError, AttributeError):
        raise PhoneError(f"{path}: not a sipproxy phones file") from None
    return out


def write_phones(path: str, phones: dict[str, ProvisionedPhone]) -> None:
    data = {"version": 1, "phones": {
        p.device: {"model": p.model, "lines": list(p.lines), "label": p.label, "image": p.image,
                   "passwords": dict(p.passwords)} for p in sorted(phones.values(), key=lambda p: p.device)}}
    replace_file(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))


@contextmanager
def locked_phones(path: str):
    """Read-modify-write the phones under an exclusive lock; yields the dict to change."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        phones = read_phones(path)
        yield phones
        write_phones(path, phones)
