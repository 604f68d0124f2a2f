"""A read-only TFTP server for the phones' files: RFC 1350, with options (RFC 2347), blksize (RFC 2348),
timeout and tsize (RFC 2349).

The phones fetch everything over TFTP at boot (seed 001 line 979; the hunt order of seed 002 line 100:
CTLSEP<mac>.tlv, SEP<mac>.cnf.xml, SIP<mac>.cnf, MGC<mac>.cnf, XMLDefault.cnf.xml, SIPDefault.cnf,
MGCDefault.cnf, then the image files). Each read request is served from a port of its own (the
transfer's TID, RFC 1350 section 4) by a `Transfer`, a state machine on the injected clock:

- DATA blocks of `blksize` bytes (512, or what the client asked, 8-65464); the last is shorter (empty when
  the file is a multiple of the block size); block numbers roll over from 65535 to 0, so files of any size go;
- a DATA block is sent again when its ACK does not come within `timeout` seconds, up to `retries` times;
  a duplicate ACK is ignored (never answered with a second DATA: the Sorcerer's Apprentice bug, RFC 1123
  4.2.3.1);
- options the server accepts are confirmed in an OACK, acknowledged by the client's ACK of block 0.

A name never leaves the TFTP root: "..", absolute paths that resolve elsewhere, symlinks out, NULs and
backslashes are refused (Access violation), and only sources in `allowed` networks are served at all.
Write requests are refused: this server only reads.
"""

import ipaddress
import os
import struct

from twisted.internet import protocol
from twisted.logger import Logger

log = Logger()

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
NOT_FOUND, ACCESS_VIOLATION, ILLEGAL, UNKNOWN_TID, OPTION_REFUSED = 1, 2, 4, 5, 8
DEFAULT_BLOCK = 512
MIN_BLOCK, MAX_BLOCK = 8, 65464  # RFC 2348
MAX_NETASCII = 16 * 1024 * 1024  # netascii is converted in memory: config files, not images


class TftpError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def error_packet(code: int, message: str) -> bytes:
    return struct.pack("!HH", ERROR, code) + message.encode("ascii", "replace") + b"\0"


def parse_request(packet: bytes) -> tuple[int, str, str, dict[str, str]]:
    """(opcode, filename, mode, options) of an RRQ or WRQ; TftpError(ILLEGAL) when it is not one."""
    if len(packet) < 4:
        raise TftpError(ILLEGAL, "Packet too short")
    opcode = struct.unpack("!H", packet[:2])[0]
    if opcode not in (RRQ, WRQ):
        raise TftpError(ILLEGAL, "Expected a read request")
    fields = packet[2:].split(b"\0")
    if len(fields) < 3 or fields[-1] != b"":
        raise TftpError(ILLEGAL, "Malformed request: fields must end with NUL")
    fields = fields[:-1]
    try:
        name, mode = fields[0].decode("ascii"), fields[1].decode("ascii").lower()
        pairs = [f.decode("ascii") for f in fields[2:]]
    except UnicodeDecodeError:
        raise TftpError(ILLEGAL, "Non-ASCII request") from None
    if mode not in ("octet", "netascii"):
        raise TftpError(ILLEGAL, f"Unsupported mode {mode!r}")
    if len(pairs) % 2:
        raise TftpError(ILLEGAL, "An option without a value")
    options = {pairs[i].lower(): pairs[i + 1] for i in range(0, len(pairs), 2)}
    return opcode, name, mode, options


def resolve(root: str, name: str) -> str:
    """The path under `root` that `name` names; TftpError(ACCESS_VIOLATION) for anything that would leave it."""
    if not name or "\0" in name or "\\" in name:
        raise TftpError(ACCESS_VIOLATION, "Illegal file name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise TftpError(ACCESS_VIOLATION, "Illegal file name")
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, *parts))
    if os.path.commonpath([real_root, path]) != real_root:
        raise TftpError(ACCESS_VIOLATION, "Illegal file name")
    return path


def negotiate(options: dict[str, str], size: int | None) -> tuple[dict[str, str], int, float | None]:
    """The options we accept (to confirm in an OACK), the block size and the timeout (None: ours)."""
    accepted: dict[str, str] = {}
    blksize, timeout = DEFAULT_BLOCK, None
    for name, value in options.items():
        if name == "blksize" and value.isdigit():
            blksize = max(MIN_BLOCK, min(MAX_BLOCK, int(value)))  # RFC 2348: the server may answer smaller
            accepted["blksize"] = str(blksize)
        elif name == "timeout" and value.isdigit() and 1 <= int(value) <= 255:
            timeout = float(value)
            accepted["timeout"] = value
        elif name == "tsize" and value.isdigit() and size is not None:
            accepted["tsize"] = str(size)  # RFC 2349: in a read request the client sends 0, we say the size
    return accepted, blksize, timeout


class Transfer:
    """One file to one client: DATA, ACK, retransmission. `send(packet)` goes to the client's TID."""

    def __init__(self, clock, send, data_source, *, blksize: int = DEFAULT_BLOCK, timeout: float = 1.0,
                 retries: int = 5, oack: dict[str, str] | None = None, on_done=None):
        self.clock = clock
        self.send = send
        self.source = data_source  # a file object (read(n)) or bytes
        self.blksize = blksize
        self.timeout = timeout
        self.retries = retries
        self.oack = oack
        self.on_done = on_done  # on_done(result, bytes_sent): "sent", "timeout", "error: ..."
        self.block = 0  # the block last sent (16 bits on the wire)
        self.sent_bytes = 0
        self.finished = False
        self._packet = b""
        self._last = False
        self._tries = 0
        self._timer = None

    def start(self) -> None:
        if self.oack:
            self._transmit(struct.pack("!H", OACK) + b"".join(
                k.encode() + b"\0" + v.encode() + b"\0" for k, v in self.oack.items()))
        else:
            self._next_block()

    def _read(self) -> bytes:
        if isinstance(self.source, bytes):
            chunk, self.source = self.source[:self.blksize], self.source[self.blksize:]
            return chunk
        return self.source.read(self.blksize)

    def _next_block(self) -> None:
        chunk = self._read()
        self.block = (self.block + 1) & 0xFFFF
        self._last = len(chunk) < self.blksize
        self.sent_bytes += len(chunk)
        self._transmit(struct.pack("!HH", DATA, self.block) + chunk)

    def _transmit(self, packet: bytes) -> None:
        self._packet = packet
        self._tries = 0
        self.send(packet)
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(self.timeout, self._expired)

    def _expired(self) -> None:
        if self.finished:
            return
        self._tries += 1
        if self._tries > self.retries:
            self._finish("timeout")
            return
        self.send(self._packet)  # the same block again
        self._arm()

    def received(self, packet: bytes) -> None:
        if self.finished or len(packet) < 4:
            return
        opcode, number = struct.unpack("!HH", packet[:4])
        if opcode == ERROR:
            message = packet[4:].split(b"\0", 1)[0].decode("ascii", "replace")
            self._finish(f"error: the client gave up ({number} {message})")
            return
        if opcode != ACK:
            self.send(error_packet(ILLEGAL, "Expected an ACK"))
            self._finish("error: not an ACK")
            return
        if number != self.block:
            return  # a duplicate or an old ACK: the timer retransmits, never the ACK (RFC 1123 4.2.3.1)
        if self._packet[:2] == struct.pack("!H", OACK) or not self._last:
            self._next_block()
            return
        self._finish("sent")

    def _finish(self, result: str) -> None:
        self.finished = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
        if self.on_done is not None:
            self.on_done(result, self.sent_bytes)


def netascii(data: bytes) -> bytes:
    """RFC 764 line ends: LF -> CR LF, a lone CR -> CR NUL."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n").replace(b"\r\0\r\n", b"\r\n")


class TransferProtocol(protocol.DatagramProtocol):
    """The port of one transfer: it talks only to the client's address and port (its TID)."""

    noisy = False  # a line per transfer is the request log's job

    def __init__(self, peer: tuple[str, int]):
        self.peer = peer
        self.transfer: Transfer | None = None

    def send(self, packet: bytes) -> None:
        if self.transport is not None:
            self.transport.write(packet, self.peer)

    def datagramReceived(self, data, addr):
        if (addr[0], addr[1]) != self.peer:
            self.transport.write(error_packet(UNKNOWN_TID, "Unknown transfer ID"), addr)
            return
        if self.transfer is not None:
            self.transfer.received(data)


class TftpServer(protocol.DatagramProtocol):
    """The well-known port: read requests in, a `Transfer` on a fresh port out; every request is logged."""

    noisy = False

    def __init__(self, clock, root: str, *, allowed: tuple, listen_transfer, requests=None, timeout: float = 1.0,
                 retries: int = 5, max_transfers: int = 200, per_address: int = 8):
        self.clock = clock
        self.root = root
        self.allowed = allowed  # ip_network objects
        self.listen_transfer = listen_transfer  # (TransferProtocol) -> port: listenUDP(0, proto, interface=...)
        self.requests = requests  # proxy: plugins/provisioning/tftplog.py RequestLog (seen, done)
        self.timeout = timeout
        self.retries = retries
        self.max_transfers = max_transfers
        # A read request's source can be forged: each costs up to (retries + 1) DATA blocks sent to it. A cap per
        # address bounds what a forger can make us send to a victim (a phone needs one or two at a time).
        self.per_address = per_address
        self.active = 0
        self.by_address: dict[str, int] = {}
        self.refused = 0

    def datagramReceived(self, data, addr):
        host, port = addr[0], addr[1]
        if not self._allowed(host):
            self.refused += 1
            return  # not even an error packet: a stranger learns nothing
        try:
            opcode, name, mode, options = parse_request(data)
            if opcode == WRQ:
                raise TftpError(ACCESS_VIOLATION, "This server is read-only")
            if self.active >= self.max_transfers or self.by_address.get(host, 0) >= self.per_address:
                raise TftpError(0, "Too many transfers: try again")
            source, size = self._open(name, mode)
        except TftpError as e:
            self.transport.write(error_packet(e.code, e.message), addr)
            if self.requests is not None and len(data) >= 4 and data[1:2] in (b"\x01", b"\x02"):
                self.requests.seen(host, _name_of(data), "not found" if e.code == NOT_FOUND else f"refused: {e.message}")
            return
        accepted, blksize, timeout = negotiate(options, size)
        peer = (host, port)
        proto = TransferProtocol(peer)
        port_ = self.listen_transfer(proto)
        self.active += 1
        self.by_address[host] = self.by_address.get(host, 0) + 1
        entry = self.requests.seen(host, name, "sending") if self.requests is not None else None

        def done(result, sent, port_=port_):
            self.active -= 1
            left = self.by_address.get(host, 1) - 1
            if left:
                self.by_address[host] = left
            else:
                self.by_address.pop(host, None)
            port_.stopListening()
            if self.requests is not None:
                self.requests.done(entry, result, sent)

        proto.transfer = Transfer(self.clock, proto.send, source, blksize=blksize, timeout=timeout or self.timeout,
                                  retries=self.retries, oack=accepted or None, on_done=done)
        proto.transfer.start()

    def _allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allowed)

    def _open(self, name: str, mode: str):
        path = resolve(self.root, name)
        try:
            if not os.path.isfile(path):
                raise FileNotFoundError(path)
            size = os.path.getsize(path)
            if mode == "netascii":
                if size > MAX_NETASCII:
                    raise TftpError(ACCESS_VIOLATION, "File too large for netascii: use octet")
                with open(path, "rb") as f:
                    data = netascii(f.read())
                return data, len(data)
            return open(path, "rb"), size
        except FileNotFoundError:
            raise TftpError(NOT_FOUND, "File not found") from None
        except PermissionError:
            raise TftpError(ACCESS_VIOLATION, "Permission denied") from None
        except OSError as e:
            raise TftpError(0, f"Cannot read the file: {e.strerror}") from None


def _name_of(data: bytes) -> str:
    return data[2:].split(b"\0", 1)[0].decode("ascii", "replace")[:200]
