"""Files in the state directory: secrets created once (mode 0600, kept across restarts), and files replaced
whole, atomically, so that no reader ever sees half of one."""

import os
import tempfile

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


def replace_file(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write `path` as a whole: a temporary file beside it, fsync, rename (readers see the old or the new)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_stamp(path: str):
    """What changes when a file is replaced or rewritten (mtime, size, inode); None when it is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
