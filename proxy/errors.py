"""Exceptions that carry what a caller needs to answer or report them.

A `SipError` becomes a SIP response (status and reason phrase); a
`ConfigError` stops startup naming the file, the key and the reason.
"""

import attrs


@attrs.define(eq=False)
class SipError(Exception):
    """A request that must be answered with `status` and `reason` (and these extra headers)."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


@attrs.define(eq=False)
class SipParseError(SipError):
    """Bytes or a header value that do not follow the SIP grammar (400 by default)."""

    status: int = 400
    reason: str = "Bad Request"

    @classmethod
    def because(cls, reason: str, status: int = 400) -> "SipParseError":
        return cls(status=status, reason=reason)


@attrs.define(eq=False)
class ConfigError(Exception):
    """A configuration file that cannot be used: names the file, key and reason."""

    path: str
    key: str
    reason: str

    def __str__(self) -> str:
        if self.key:
            return f"{self.path}: {self.key}: {self.reason}"
        return f"{self.path}: {self.reason}"


class CommandError(Exception):
    """A `sipproxy-admin` command that cannot be done: printed as `sipproxy-admin: <message>`, exit status 1."""
