"""JSON log lines (proxy/logs.py): one valid object per line, with the event's plain fields."""

import io
import json

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from proxy.logs import JsonLines


class JsonLinesTests(SynchronousTestCase):
    def setUp(self):
        self.out = io.StringIO()
        publisher = LogPublisher(JsonLines(self.out))
        self.log = Logger(namespace="proxy.registration.registrar", observer=publisher)

    def records(self):
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def test_one_object_per_line_with_the_plain_fields(self):
        self.log.info("Registered {aor} for {seconds} s\nfrom {host}", aor="sip:1001@example.com", seconds=3600,
                      host="192.0.2.5", binding=object())
        self.log.warn("Locked out {user}", user='1001 "quoted"')
        first, second = self.records()
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["system"], "proxy.registration.registrar")
        self.assertEqual(first["message"], "Registered sip:1001@example.com for 3600 s\nfrom 192.0.2.5")
        self.assertEqual((first["aor"], first["seconds"]), ("sip:1001@example.com", 3600))
        self.assertNotIn("binding", first)  # not a plain value
        self.assertTrue(first["time"].endswith("+00:00"))
        self.assertEqual((second["level"], second["user"]), ("warn", '1001 "quoted"'))

    def test_a_failure_carries_its_traceback(self):
        try:
            1 / 0
        except ZeroDivisionError:
            self.log.failure("Handling a message from {host}", host="192.0.2.9")
        (record,) = self.records()
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertEqual(record["host"], "192.0.2.9")
