"""`twistd --logger proxy.logs.json_lines`: the whole log of a real server, workers included, is JSON lines."""

import json
import os
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.harness import REPO, free_port, options_probe


class JsonLogTests(SynchronousTestCase):
    def test_every_line_is_one_json_object(self):
        port, admin, web = free_port(), free_port(), free_port()
        directory = tempfile.mkdtemp(prefix="sipproxy-json-")
        config = os.path.join(directory, "sipproxy.toml")
        with open(config, "w") as f:
            f.write(f'[server]\nlisten = ["udp:{port}:interface=127.0.0.1"]\nstate_dir = "state"\nworkers = 2\n'
                    f'domains = ["localhost"]\n[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n'
                    f'[phone_web]\nlisten = "tcp:{web}:interface=127.0.0.1"\n')
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        process = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                                    "--pidfile=", "--logger", "proxy.logs.json_lines", "sipproxy", "--config", config],
                                   cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 15
            while not options_probe(port) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            process.terminate()
            out, err = process.communicate(timeout=15)
        lines = out.decode().splitlines()
        records = [json.loads(line) for line in lines]  # raises on any line that is not one JSON object
        self.assertEqual(err.decode().strip(), "")
        messages = [r["message"] for r in records]
        self.assertTrue(any(m.startswith("Worker 1 ready") for m in messages), messages)
        from_worker = [r for r in records if r["system"].startswith("worker 1: ")]
        self.assertTrue(any("bindings restored" in r["message"] for r in from_worker), from_worker)
        self.assertTrue(all(r["level"] in ("debug", "info", "warn", "error", "critical") for r in records))
