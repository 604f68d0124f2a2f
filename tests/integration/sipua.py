"""A minimal SIP user agent on a real UDP socket, for integration tests that need full control of each message.

SIPp plays the phones where a scenario is enough; this plays an attacker
(messages no scenario would send) and the two ends of a call whose in-dialog
requests must be written by hand (re-INVITE and BYE in both directions,
across a server restart).
"""

import hashlib
import os
import re
import socket
import time


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class UdpAgent:
    def __init__(self, server_port: int, port: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.server = ("127.0.0.1", server_port)

    def close(self) -> None:
        self.sock.close()

    def send(self, text: str, body: str = "", to=None) -> None:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        lines.append(f"Content-Length: {len(body.encode())}")
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n" + body).encode(), to or self.server)

    def receive(self, timeout: float = 3.0, want=None) -> str | None:
        """The next message (text) for which want(text) is true, or None after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data, _ = self.sock.recvfrom(65535)
            except OSError:
                return None
            text = data.decode("utf-8", "replace")
            if want is None or want(text):
                return text

    def expect_nothing(self, seconds: float = 1.0) -> list[str]:
        got = []
        while (text := self.receive(seconds)) is not None:
            got.append(text)
        return got

    def via(self, branch: str | None = None) -> str:
        return f"SIP/2.0/UDP 127.0.0.1:{self.port};branch=z9hG4bK{branch or os.urandom(6).hex()};rport"

    def final(self, cseq_method: str, timeout: float = 5.0) -> str | None:
        """The next final response (>= 200) to a request with this CSeq method."""
        return self.receive(timeout, lambda t: _status(t) >= 200 and header(t, "CSeq").endswith(cseq_method))


def _status(text: str) -> int:
    m = re.match(r"SIP/2\.0 (\d{3})", text)
    return int(m.group(1)) if m else 0


def status(text: str | None) -> int:
    return 0 if text is None else _status(text)


def header(text: str, name: str) -> str:
    m = re.search(rf"^{name}:\s*(.*?)\r?$", text, re.M | re.I)
    return m.group(1).strip() if m else ""


def headers(text: str, name: str) -> list[str]:
    return [v.strip() for v in re.findall(rf"^{name}:\s*(.*?)\r?$", text, re.M | re.I)]


def digest(user: str, password: str, realm: str, challenge_header: str, method: str, uri: str,
           header_name: str = "Proxy-Authorization") -> str:
    """The phone's answer (qop=auth) to a challenge, computed independently of proxy.registration.auth."""
    nonce = re.search(r'nonce="([^"]+)"', challenge_header).group(1)
    ha1 = md5(f"{user}:{realm}:{password}")
    ha2 = md5(f"{method}:{uri}")
    cnonce = os.urandom(4).hex()
    response = md5(f"{ha1}:{nonce}:00000001:{cnonce}:auth:{ha2}")
    return (f'{header_name}: Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{response}", algorithm=MD5, qop=auth, nc=00000001, cnonce="{cnonce}"')
