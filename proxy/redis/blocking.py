"""A blocking Redis connection for `sipproxy-admin` (no reactor there): one command at a time.

It finds the primary the way the server does (the URLs in turn, or the
Sentinels), and fails with `RedisUnavailable` naming what it tried, within
the configured timeout per step.
"""

import socket

from proxy.redis.client import RedisAddress, RedisUnavailable, _host_port
from proxy.redis.resp import ReplyError, ReplyReader, encode


class BlockingRedis:
    def __init__(self, config):
        """`config`: proxy/config.py `LocationConfig`."""
        self.config = config
        self._socket = None
        self._reader = ReplyReader()

    def _open(self, address: RedisAddress) -> socket.socket:
        timeout = max(self.config.timeout * 4, 1.0)
        if address.path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address.path)
        else:
            if address.tls:
                raise RedisUnavailable("sipproxy-admin does not speak TLS to Redis: run the command on a node "
                                       "while it is running (it goes through the node's admin API)")
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
        return sock

    def _ask(self, sock: socket.socket, *args):
        sock.sendall(encode(*args))
        reader = ReplyReader()
        while True:
            data = sock.recv(65536)
            if not data:
                raise RedisUnavailable("Redis closed the connection")
            replies = reader.feed(data)
            if replies:
                if isinstance(replies[0], ReplyError):
                    raise replies[0]
                return replies[0]

    def _addresses(self):
        config = self.config
        if not config.sentinels:
            return [RedisAddress.parse(url, config.password) for url in config.urls]
        found = []
        for sentinel in config.sentinels:
            host, port = _host_port(sentinel)
            try:
                sock = self._open(RedisAddress(host=host, port=port))
                with sock:
                    reply = self._ask(sock, "SENTINEL", "get-master-addr-by-name", config.service)
            except (OSError, RedisUnavailable, ReplyError):
                continue
            if isinstance(reply, list) and len(reply) == 2:
                found.append(RedisAddress(host=reply[0].decode(), port=int(reply[1]), password=config.password))
                break
        return found

    def connect(self) -> None:
        errors = []
        for address in self._addresses():
            try:
                sock = self._open(address)
                if address.password:
                    self._ask(sock, "AUTH", address.password)
                if address.db:
                    self._ask(sock, "SELECT", address.db)
                role = self._ask(sock, "ROLE")
                if role and role[0] == b"master":
                    self._socket = sock
                    return
                sock.close()
                errors.append(f"{address.path or address.host}: not the primary")
            except (OSError, RedisUnavailable, ReplyError) as e:
                errors.append(f"{address.path or f'{address.host}:{address.port}'}: {e}")
        raise RedisUnavailable("cannot reach the Redis primary (" + ("; ".join(errors) or "no sentinel knows it") + ")")

    def execute(self, *args):
        if self._socket is None:
            self.connect()
        return self._ask(self._socket, *args)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
