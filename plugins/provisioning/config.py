"""[plugins.provisioning]: checked at startup and by `sipproxy-admin check-config`; every key named in errors.

    tftp_root = "/srv/tftp"        # default: [checksync] tftp_root, else <state_dir>/tftp
    tftp_listen = "udp:69"         # or "udp:6969:interface=192.0.2.1" (port 69 needs root or CAP_NET_BIND_SERVICE)
    allowed = ["10.0.0.0/8"]       # who may fetch files (default: loopback and the private ranges)
    image_version = "P0S3-08-12-00"   # what SIPDefault.cnf tells every phone to run ("": leave it out)
    proxy_address = ""             # proxy1_address (default: the server's advertised address)
    proxy_port = 0                 # proxy1_port (default: the server's UDP port)
    proxy_backup = ""              # SIP-SRST backup (seed 001 line 709), port 5060 unless "host:port"
    proxy_emergency = ""           # the emergency proxy, likewise
    register_expires = 3600        # timer_register_expires
    nat_address = ""               # nat_enable + nat_address for phones behind NAT
    dial_plan = [["9,011*", 6], ["9,1..........", 0], ["*", 15]]   # dialplan.xml templates: MATCH and Timeout
    settings = { time_zone = "EST", dst_auto_adjust = "1" }        # any other SIPDefault.cnf parameter
    password_length = 16           # the generated line passwords
"""

import ipaddress
import os
import re

import attrs

from plugins.provisioning.cnf import PARAMETERS, PHONE_ONLY, check_value
from proxy.errors import ConfigError

PRIVATE = ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128", "fc00::/7", "fe80::/10")
# A dial plan for sites that dial 9 for the PSTN (seed 001 line 1480, the North American sample).
DEFAULT_DIAL_PLAN = (("9,011*", 6), ("9,1..........", 0), ("9,.......", 0), ("*", 15))
_MATCH = re.compile(r"[0-9.*,#!w\\]+")  # digits, . (any), * (any run), , (second dial tone), #, \* (seed 001 lines 1446 and 1530)


@attrs.frozen
class ProvisioningConfig:
    tftp_root: str
    tftp_listen: str = "udp:69"
    allowed: tuple = ()
    image_version: str = ""
    proxy_address: str = ""
    proxy_port: int = 0
    proxy_backup: str = ""
    proxy_emergency: str = ""
    register_expires: int = 3600
    nat_address: str = ""
    dial_plan: tuple = DEFAULT_DIAL_PLAN
    settings: dict = attrs.field(factory=dict)
    password_length: int = 16
    timeout: float = 1.0  # TFTP retransmission (a client's timeout option overrides it)
    retries: int = 5


_KEYS = {f.name for f in attrs.fields(ProvisioningConfig)}


def with_root(config: ProvisioningConfig, server_config) -> ProvisioningConfig:
    """tftp_root filled in: [checksync] tftp_root (where check-sync writes syncinfo.xml), else <state_dir>/tftp."""
    if config.tftp_root:
        return config
    root = server_config.checksync.tftp_root or os.path.join(server_config.server.state_dir, "tftp")
    return attrs.evolve(config, tftp_root=root)


def parse(table: dict, path: str) -> ProvisioningConfig:
    def error(key, reason):
        return ConfigError(path, f"plugins.provisioning.{key}", reason)

    for key in table:
        if key not in _KEYS:
            raise error(key, "unknown key")
    root = table.get("tftp_root", "")
    if not isinstance(root, str):
        raise error("tftp_root", "must be a directory path")
    if root and not os.path.isabs(root) and path not in ("", "<defaults>"):
        root = os.path.join(os.path.dirname(os.path.abspath(path)), root)  # like state_dir: next to the file
    listen = table.get("tftp_listen", "udp:69")
    if not isinstance(listen, str) or not re.fullmatch(r"udp6?:\d{1,5}(:interface=[^:]+|:interface=\[[^\]]+\])?", listen) \
            or not 0 < int(listen.split(":")[1]) < 65536:
        raise error("tftp_listen", 'must be "udp:PORT" or "udp:PORT:interface=ADDRESS"')
    allowed = []
    for value in table.get("allowed", list(PRIVATE)) if isinstance(table.get("allowed", []), list) else [None]:
        try:
            allowed.append(ipaddress.ip_network(value, strict=False))
        except (TypeError, ValueError):
            raise error("allowed", f"{value!r} is not an address or network") from None
    image = table.get("image_version", "")
    if not isinstance(image, str) or (image and check_value("image_version", image)):
        raise error("image_version", f"{image!r} {check_value('image_version', str(image))}")
    strings = {}
    for key in ("proxy_address", "proxy_backup", "proxy_emergency", "nat_address"):
        value = table.get(key, "")
        if not isinstance(value, str) or any(c.isspace() or c in "\"'" for c in value):
            raise error(key, "must be a host name or address (host or host:port)")
        strings[key] = value
    numbers = {}
    for key, low, high, default in (("proxy_port", 0, 65535, 0), ("register_expires", 1, 3932100, 3600),
                                    ("password_length", 10, 64, 16), ("retries", 1, 20, 5)):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise error(key, f"must be a whole number from {low} to {high}")
        numbers[key] = value
    timeout = table.get("timeout", 1.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0.1 <= timeout <= 255:
        raise error("timeout", "must be seconds from 0.1 to 255")
    plan = table.get("dial_plan", [list(t) for t in DEFAULT_DIAL_PLAN])
    if not isinstance(plan, list) or not all(
            isinstance(t, list) and len(t) == 2 and isinstance(t[0], str) and _MATCH.fullmatch(t[0])
            and isinstance(t[1], int) and not isinstance(t[1], bool) and 0 <= t[1] <= 60 for t in plan):
        raise error("dial_plan", 'must be a list of [MATCH, Timeout seconds] pairs, e.g. [["9,011*", 6], ["*", 15]]')
    settings = table.get("settings", {})
    if not isinstance(settings, dict):
        raise error("settings", "must be a table of SIPDefault.cnf parameters")
    checked = {}
    for name, value in settings.items():
        key = name.lower()
        if key not in PARAMETERS:
            raise error(f"settings.{name}", "not a parameter of the phones' configuration (seed 001 Table 3-3)")
        if key in PHONE_ONLY:
            raise error(f"settings.{name}", "a phone's own parameter: it belongs in SIP<MAC>.cnf, not SIPDefault.cnf")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        text = {"true": "1", "false": "0"}.get(text, text)
        problem = check_value(key, text)
        if problem:
            raise error(f"settings.{name}", f"{text!r} {problem}")
        checked[key] = text
    return ProvisioningConfig(tftp_root=root, tftp_listen=listen, allowed=tuple(allowed), image_version=image,
                              dial_plan=tuple((m, t) for m, t in plan), settings=checked, timeout=float(timeout),
                              **strings, **numbers)
