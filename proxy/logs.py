"""Log output as JSON lines, for journald and log shippers: `twistd --logger proxy.logs.json_lines ...`.

One JSON object per line on standard output: `time` (ISO 8601, UTC), `level`,
`system` (the module, or `worker N: module` for a worker's line), `message`
(the rendered text), the event's own fields when they are plain values
(`user`, `address`, `status`...), and `traceback` for a failure. Twisted's
own `jsonFileLogObserver` writes record separators and every internal field;
this is what a log query wants.
"""

import datetime
import json
import sys

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

_PLAIN = (str, int, float, bool, type(None))
_SKIPPED = frozenset({"message", "format", "isError", "time", "system", "failure", "why"})


@implementer(ILogObserver)
class JsonLines:
    def __init__(self, out):
        self.out = out

    def __call__(self, event: dict) -> None:
        level = event.get("log_level", LogLevel.info)
        stamp = datetime.datetime.fromtimestamp(event.get("log_time") or 0, datetime.timezone.utc)
        record = {
            "time": stamp.isoformat(timespec="milliseconds"),
            "level": getattr(level, "name", str(level)),
            "system": event.get("log_system") if event.get("log_system") not in (None, "-")
            else event.get("log_namespace", "-"),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in _SKIPPED or key in record or not isinstance(value, _PLAIN):
                continue
            record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            try:
                record["traceback"] = failure.getTraceback()
            except Exception:  # a failure relayed from a worker carries only its text
                record["traceback"] = str(failure)
        try:
            self.out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self.out.flush()
        except (OSError, ValueError):
            pass  # the output is gone (a closed pipe): nothing else can be told


def json_lines() -> JsonLines:
    """The factory `twistd --logger` calls."""
    return JsonLines(sys.stdout)
