"""SRST on this node, put together: the log, the replicator, the served resource, one link per peer.

Built by proxy/core.py in the primary process only (with workers, the others
learn bindings from it as from any change); service.py listens on `[srst]
listen` with `resource` and runs `start`/`stop`.
"""

import os
import secrets

from proxy.srst.changelog import ChangeLog
from proxy.srst.link import PeerLink, SrstResource
from proxy.srst.replicator import Replicator

SECRET_FILE = "srst-secret"


def load_srst_secret(path: str) -> bytes:
    """The shared secret; created (0600) when missing, and then the other side needs a copy (logged by the caller)."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
        if len(secret) >= 16:
            return secret
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    secret = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    return secret


class SrstNode:
    def __init__(self, reactor, config, *, location, forwarding_store, users_path: str, node: str, trust_root=None):
        """`config`: proxy/config.py `ProxyConfig` (its [srst] and [server] shared_dir)."""
        srst = config.srst
        self.config = srst
        self.secret_path = srst.secret_file or os.path.join(config.server.shared, SECRET_FILE)
        created = not os.path.exists(self.secret_path)
        self.secret = load_srst_secret(self.secret_path)
        self.secret_created = created
        self.log = ChangeLog(srst.backlog)
        self.replicator = Replicator(reactor, location, forwarding_store, users_path, self.log, node=node,
                                     role=srst.role)
        self.resource = SrstResource(reactor, self.replicator, self.secret)
        self.links = [PeerLink(reactor, peer, replicator=self.replicator, secret=self.secret, node=node, tls=srst.tls,
                               trust_root=trust_root, interval=srst.interval) for peer in srst.peers]

    def start(self) -> None:
        self.replicator.start()
        for link in self.links:
            link.start()

    def stop(self) -> None:
        for link in self.links:
            link.stop()
        self.replicator.stop()

    def status(self) -> list[dict]:
        return [link.status() for link in self.links]

    def counters(self) -> dict:
        return {"changes_sent": self.replicator.logged, "changes_applied": self.replicator.applied,
                "resyncs": sum(link.resyncs for link in self.links), "refused": self.resource.refused,
                "peers_up": sum(link.state == "up" for link in self.links), "peers": len(self.links),
                "backlog": len(self.log)}
