"""The phones' configuration file syntax (SIPDefault.cnf, SIP<MAC>.cnf) and its parameters.

Seed 001 line 1025: one `variable-name : value ; optional comments` a line; names are not case
sensitive; a value with white space inside must be quoted, with the same quote at both ends; `;` and
`#` start comments; blank and comment lines are allowed; lines end with LF or CR LF.

`PARAMETERS` is the parameter catalogue of Tables 3-2, 3-3 and 3-4 (seed 001 lines 1747-2300), with the
valid values the tables give. `parse` reads a file into entries and syntax errors; `check_value` says
what is wrong with one value; `render` writes entries back in the same syntax (the round trip the tests
make: what we write parses, and the lint finds nothing in it).
"""

import re

import attrs


@attrs.frozen
class Entry:
    line: int
    name: str  # lower case
    value: str
    raw_name: str = ""


@attrs.frozen
class SyntaxProblem:
    line: int
    message: str


def _strip_comment(text: str) -> str:
    for i, c in enumerate(text):
        if c in ";#":
            return text[:i]
    return text


def parse(text: str) -> tuple[list[Entry], list[SyntaxProblem]]:
    entries, problems = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        name, colon, rest = line.partition(":")
        if not colon:
            problems.append(SyntaxProblem(number, "not 'name : value' (a comment must start with ; or #)"))
            continue
        name = name.strip()
        if not name or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            problems.append(SyntaxProblem(number, f"{name!r} is not a parameter name"))
            continue
        rest = rest.strip()
        if rest[:1] in ("'", '"'):
            quote = rest[0]
            end = rest.find(quote, 1)
            if end < 0:
                problems.append(SyntaxProblem(number, f"the value of {name} opens a {quote} quote and never closes it"))
                continue
            value = rest[1:end]
            after = rest[end + 1:].strip()
            if after and after[0] not in ";#":
                problems.append(SyntaxProblem(number, f"text after the quoted value of {name}: start a comment "
                                                      "with ; or #"))
                continue
        else:
            value = _strip_comment(rest).strip()
            if re.search(r"\s", value):
                problems.append(SyntaxProblem(number, f"the value of {name} holds white space: quote it"))
                continue
        entries.append(Entry(number, name.lower(), value, name))
    return entries, problems


def render(entries: list[tuple[str, str]], comments: dict[str, str] | None = None) -> str:
    """`name: "value"` lines (values always quoted, as Cisco's samples do), each with its comment, if any."""
    lines = []
    for name, value in entries:
        if any(q in value for q in "\"\r\n"):
            raise ValueError(f"{name}: a value cannot hold a double quote or a line break")
        comment = (comments or {}).get(name)
        lines.append(f'{name}: "{value}"' + (f"  ; {comment}" if comment else ""))
    return "\n".join(lines) + "\n"


# -- the catalogue --------------------------------------------------------------------------------------

def _choices(*values: str, case: bool = False):
    allowed = set(values) if case else {v.lower() for v in values}

    def check(value: str) -> str | None:
        if (value if case else value.lower()) in allowed:
            return None
        return f"must be one of {', '.join(values)}"
    return check


def _number(low: int, high: int | None = None):
    def check(value: str) -> str | None:
        if not value.isdigit():
            return "must be a whole number"
        n = int(value)
        if n < low or (high is not None and n > high):
            return f"must be {low} to {high}" if high is not None else f"must be {low} or more"
        return None
    return check


def _text(limit: int | None = None):
    def check(value: str) -> str | None:
        if limit is not None and len(value) > limit:
            return f"at most {limit} characters"
        return None
    return check


_ONE_OF_FOUR = _choices("0", "1", "2", "3")  # off/on, then off/on for good (no user control)
_SWITCH = _choices("0", "1")
_PORT = _number(1, 65535)
_IMAGE = re.compile(r"P0S3(?:\d{4}|-\d{2}-\d{1,2}-\d{2}[A-Za-z0-9]*)\Z", re.I)


def _image(value: str) -> str | None:
    if _IMAGE.match(value):
        return None
    if re.match(r"P0[03M]", value, re.I):
        return "names an SCCP or MGCP image: these files are for SIP firmware (P0S3...)"
    return "is not a SIP image name such as P0S3-08-12-00 or P0S30203 (no extension)"


PARAMETERS = {
    "anonymous_call_block": _ONE_OF_FOUR, "autocomplete": _SWITCH, "call_hold_ringback": _ONE_OF_FOUR,
    "call_waiting": _ONE_OF_FOUR, "callerid_blocking": _ONE_OF_FOUR, "cnf_join_enable": _SWITCH,
    "date_format": _choices("M/D/Y", "D/M/Y", "Y/M/D", "Y/D/M", "Y-M-D", "YY-M-D"),
    "dial_template": _text(), "directory_url": _text(), "dnd_control": _ONE_OF_FOUR,
    "dst_auto_adjust": _SWITCH, "dst_offset": _text(), "dst_start_day": _text(), "dst_start_day_of_week": _text(),
    "dst_start_month": _text(), "dst_start_time": _text(), "dst_start_week_of_month": _text(),
    "dst_stop_day": _text(), "dst_stop_day_of_week": _text(), "dst_stop_month": _text(), "dst_stop_time": _text(),
    "dst_stop_week_of_month": _text(),
    "dtmf_avt_payload": _number(96, 127), "dtmf_db_level": _number(1, 5), "dtmf_inband": _SWITCH,
    "dtmf_outofband": _choices("none", "avt", "avt_always"),
    "dyn_dns_addr_1": _text(), "dyn_dns_addr_2": _text(), "dyn_tftp_addr": _text(),
    "enable_vad": _SWITCH, "end_media_port": _number(16384, 32766),
    "http_proxy_addr": _text(), "http_proxy_port": _PORT, "image_version": _image, "language": _text(),
    "logo_url": _text(), "messages_uri": _text(), "nat_address": _text(), "nat_enable": _SWITCH,
    "nat_received_processing": _SWITCH,
    "network_media_type": _choices("Auto", "Full100", "Half100", "Full10", "Half10"),
    "network_port2_type": _choices("Hub/Switch", "PC"),
    "outbound_proxy": _text(), "outbound_proxy_port": _PORT,
    "phone_label": _text(11), "phone_password": _text(), "phone_prompt": _text(),
    "preferred_codec": _choices("g711alaw", "g711ulaw", "g729a", "g729", "none"),
    "proxy_backup": _text(), "proxy_backup_port": _PORT, "proxy_emergency": _text(), "proxy_emergency_port": _PORT,
    "proxy_register": _SWITCH, "remote_party_id": _SWITCH, "semi_attended_transfer": _SWITCH,
    "services_url": _text(), "sip_invite_retx": _number(1), "sip_retx": _number(1),
    "sntp_mode": _choices("unicast", "multicast", "anycast", "directedbroadcast"), "sntp_server": _text(),
    "start_media_port": _number(16384, 32766), "sync": _text(32), "telnet_level": _number(0, 2),
    "tftp_cfg_dir": _text(), "time_format_24hr": _ONE_OF_FOUR, "time_zone": _text(),
    "timer_invite_expires": _number(1), "timer_register_expires": _number(1, 3932100),
    "timer_t1": _number(1), "timer_t2": _number(1), "tos_media": _number(0, 5),
    "user_info": _choices("none", "phone", "ip"), "voip_control_port": _number(1025, 65535),
}
for _n in range(1, 7):
    PARAMETERS.update({f"line{_n}_authname": _text(), f"line{_n}_displayname": _text(), f"line{_n}_name": _text(),
                       f"line{_n}_password": _text(), f"line{_n}_shortcode": _text(),
                       f"proxy{_n}_address": _text(), f"proxy{_n}_port": _PORT})
# Only in a phone's own file (seed 001 line 1058: "Except for parameters used to defined the lines and users").
PHONE_ONLY = frozenset(n for n in PARAMETERS if re.match(r"line\d_", n)) | {"phone_label"}


def check_value(name: str, value: str) -> str | None:
    """What is wrong with `value` for `name`, or None; an empty value (or UNPROVISIONED) clears a setting."""
    check = PARAMETERS.get(name)
    if check is None or value in ("", "UNPROVISIONED"):
        return None
    return check(value)
