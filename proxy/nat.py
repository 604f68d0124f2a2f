"""The one NAT rule: when to answer or send to the packet's source instead of the address a message names.

The 7940/7960 send no `rport`, and behind NAT their Via and Contact name a
private address and port that cannot be reached (seed 001 line 709). The
rule, for a Via (responses) and a Contact (requests to a binding) alike:

- `auto`: the named host is private and differs from the source: use the source;
- `always`: always the source;
- `never`: always what the message names.
"""

import attrs

from proxy.transport import is_private_address

MODES = ("auto", "always", "never")


@attrs.frozen
class NatPolicy:
    mode: str = "auto"

    def __attrs_post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"nat mode must be one of {', '.join(MODES)}")

    def use_source(self, named_host: str, source_host: str) -> bool:
        """Whether a message that names `named_host`, and came from `source_host`, is answered at its source."""
        if self.mode == "always":
            return True
        return self.mode == "auto" and named_host != source_host and is_private_address(named_host)
