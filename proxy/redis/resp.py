"""RESP2, the Redis wire protocol: commands out, replies in. No I/O.

A command is an array of bulk strings; a reply is one of `+simple`, `-error`,
`:integer`, `$bulk` (or `$-1`, nil) and `*array` (or `*-1`). `ReplyReader`
takes bytes as they arrive and yields whole replies; a malformed stream
raises `ProtocolError`, and the connection is then dropped, never guessed at.
"""


class ProtocolError(Exception):
    """The server sent something that is not RESP2."""


class ReplyError(Exception):
    """A `-ERR ...` reply: the command failed at the server (the message is Redis's own)."""


def encode(*args) -> bytes:
    """One command: `encode("SET", "k", "v")` -> `*3\\r\\n$3\\r\\nSET...`."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


_MAX_BULK = 512 * 1024 * 1024  # Redis's own proto-max-bulk-len
_NESTING = 8  # our commands never get deeper replies than this


class ReplyReader:
    """Feed bytes with `feed`; `replies()` gives every complete reply so far, in order."""

    def __init__(self):
        self._buffer = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> list:
        self._buffer += data
        replies = []
        while True:
            start = self._pos
            try:
                reply = self._read(0)
            except _Incomplete:
                self._pos = start
                break
            replies.append(reply)
        if self._pos:
            del self._buffer[:self._pos]
            self._pos = 0
        return replies

    def _line(self) -> bytes:
        end = self._buffer.find(b"\r\n", self._pos)
        if end < 0:
            if len(self._buffer) - self._pos > 65536:
                raise ProtocolError("reply line longer than 64 KiB")
            raise _Incomplete
        line = bytes(self._buffer[self._pos:end])
        self._pos = end + 2
        return line

    def _read(self, depth: int):
        if depth > _NESTING:
            raise ProtocolError("reply nested too deep")
        line = self._line()
        if not line:
            raise ProtocolError("empty reply line")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return ReplyError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return _integer(rest)
        if kind == b"$":
            length = _integer(rest)
            if length < 0:
                return None
            if length > _MAX_BULK:
                raise ProtocolError("bulk reply too large")
            if len(self._buffer) - self._pos < length + 2:
                raise _Incomplete
            value = bytes(self._buffer[self._pos:self._pos + length])
            if self._buffer[self._pos + length:self._pos + length + 2] != b"\r\n":
                raise ProtocolError("bulk reply not ended by CRLF")
            self._pos += length + 2
            return value
        if kind == b"*":
            count = _integer(rest)
            if count < 0:
                return None
            return [self._read(depth + 1) for _ in range(count)]
        raise ProtocolError(f"unknown reply type {kind!r}")


class _Incomplete(Exception):
    pass


def _integer(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        raise ProtocolError(f"not an integer: {text[:20]!r}") from None
