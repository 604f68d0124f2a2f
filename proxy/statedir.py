"""Files in the state directory that hold secrets: created once, mode 0600, kept across restarts."""

import os

from twisted.logger import Logger

log = Logger()


def secret_file(state_dir: str, name: str, make, min_length: int = 32) -> bytes:
    """The content of `<state_dir>/<name>`, created with `make()` (bytes) when missing or too short."""
    path = os.path.join(state_dir, name)
    try:
        with open(path, "rb") as f:
            content = f.read().strip()
        if len(content) >= min_length:
            return content
        # Never silently: whoever copied the old secret (Prometheus, another node) must know.
        log.warn("{path} is damaged ({size} bytes, needs {min}): replaced with a new secret",
                 path=path, size=len(content), min=min_length)
    except FileNotFoundError:
        pass
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    content = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(content + b"\n")
    return content
