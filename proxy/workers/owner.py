"""Which worker owns a datagram: found on the raw bytes, before anything is parsed.

A request belongs to the worker its Call-ID hashes to, so every message of a
transaction (retransmissions, CANCEL, the ACK of a non-2xx) meets the
transaction where it lives. A response belongs to the worker named by the
`worker=` parameter of its top Via, which that worker wrote when it sent the
request (`Identity.via_value`): a request can arrive over TCP at the primary
or be made up by it (keepalive OPTIONS, check-sync NOTIFY), so the Call-ID
alone would not say who waits for the answer.

`None` means "whoever read it": no Call-ID, no marker (a response we did not
cause), or a datagram too broken to tell; the server there answers or drops it.
"""

import re
import zlib

WORKER_PARAM = "worker"

# The first Call-ID (or compact i) header line, and the first Via (or v) header line.
_CALL_ID = re.compile(rb"\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
_VIA = re.compile(rb"\n(?:via|v)[ \t]*:([^\r\n]*)", re.IGNORECASE)
_MARKER = re.compile(rb";[ \t]*worker[ \t]*=[ \t]*([0-9]{1,3})", re.IGNORECASE)


def call_id_owner(call_id: bytes, count: int) -> int:
    """The worker (0..count-1) a Call-ID belongs to; the same in every process (CRC-32, not Python's hash)."""
    return zlib.crc32(call_id.strip()) % count


def owner_of(data: bytes, count: int) -> int | None:
    """The worker a datagram belongs to, or None (see the module docstring)."""
    if data.startswith(b"SIP/"):
        via = _VIA.search(data)
        if via is None:
            return None
        marker = _MARKER.search(via.group(1).split(b",", 1)[0])
        if marker is None:
            return None
        index = int(marker.group(1))
        return index if index < count else None
    found = _CALL_ID.search(data)
    if found is None or not found.group(1).strip():
        return None
    return call_id_owner(found.group(1), count)
