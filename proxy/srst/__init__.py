"""SIP-SRST: a backup proxy that already knows every phone (docs/srst.md).

changelog.py: this node's numbered changes and the rule that decides between two copies of a binding;
replicator.py: what goes into the log and what a peer's changes do here; link.py: the HTTP link (served and
pulled, signed with the shared secret) and each peer's state.
"""
