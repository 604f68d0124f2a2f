"""HTTP sites with bounds: every twisted.web site of the server is built here.

twisted.web by itself spools any request body to disk (100 MB was accepted
before a 405) and keeps idle connections for 12 hours. Here a body larger
than `max_body` is refused with 413 as soon as its length is known (or as it
passes the bound, when chunked), a header section larger than
`max_header_bytes` with 431, and a connection idle for `timeout` seconds is
closed.
"""

import io
import json

from twisted.web import http, resource, server


def _refuse(channel, status: int, phrase: str) -> None:
    """Answer, then close our side and discard what the peer still sends.

    Closing outright while the peer is still sending makes the kernel answer
    with a reset, and the peer loses the answer; so: the answer, a FIN, and
    everything after it read and dropped until the peer closes (or the idle
    timeout does), as nginx's lingering close.
    """
    transport = channel.transport
    if transport is None or getattr(channel, "_refused", False):
        return
    channel._refused = True
    body = f"{status} {phrase}\n".encode()
    transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (status, phrase.encode(), len(body), body))
    channel.dataReceived = _discard
    if hasattr(transport, "loseWriteConnection"):
        transport.loseWriteConnection()
    else:
        transport.loseConnection()


def _discard(data: bytes) -> None:
    return None


class _BoundedRequest(server.Request):
    max_body = 64 * 1024

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refused = False

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            self._refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.refused:
            return
        if self.content.tell() + len(data) > self.max_body:  # chunked, without a length
            self._refuse_body()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if self.refused:
            return
        super().requestReceived(command, path, version)

    def _refuse_body(self):
        self.refused = True
        self.content = io.BytesIO()
        _refuse(self.channel, 413, "Request Entity Too Large")


class _BoundedChannel(http.HTTPChannel):
    totalHeadersSize = 8 * 1024

    def lineReceived(self, line):
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            _refuse(self, 431, "Request Header Fields Too Large")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line):
        # One line longer than LineReceiver takes (16 KB) never reaches lineReceived.
        _refuse(self, 431, "Request Header Fields Too Large")


def bounded_site(resource, *, max_body: int = 64 * 1024, max_header_bytes: int = 8 * 1024,
                 timeout: float = 30.0) -> server.Site:
    """A Site for `resource` with the bounds above (HTTP/1.1 only)."""
    request_class = type("BoundedRequest", (_BoundedRequest,), {"max_body": max_body})
    channel_class = type("BoundedChannel", (_BoundedChannel,), {"totalHeadersSize": max_header_bytes})
    site = server.Site(resource, requestFactory=request_class, timeout=timeout)
    site.protocol = channel_class
    return site


class JsonResource(resource.Resource):
    """A leaf answering JSON, for the admin API's plugin resources: `handler(method, path, request)` returns
    (status, body); `path` is what follows the mount point, as a list of strings."""

    isLeaf = True

    def __init__(self, handler):
        super().__init__()
        self.handler = handler

    def render(self, request):
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        status, body = self.handler(request.method.decode("ascii", "replace"), path, request)
        request.setResponseCode(status)
        return json.dumps(body, indent=1).encode() + b"\n"
