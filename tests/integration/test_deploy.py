"""The deployment kit: etc/sipproxy.service is a unit systemd accepts (issue 20)."""

import os
import shutil
import subprocess
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.harness import REPO


class SystemdUnitTests(SynchronousTestCase):
    def test_the_unit_verifies(self):
        analyze = shutil.which("systemd-analyze")
        twistd = shutil.which("twistd")
        if analyze is None or twistd is None:
            if os.environ.get("CI") == "true":
                raise AssertionError("systemd-analyze is not installed; .ci/run must install systemd")
            raise SkipTest("systemd-analyze or twistd is not installed")
        with open(os.path.join(REPO, "etc", "sipproxy.service")) as f:
            unit = f.read()
        self.assertIn("ExecStart=/opt/sipproxy/bin/twistd --nodaemon --pidfile= ", unit)
        for needed in ("User=sipproxy", "StateDirectory=sipproxy", "ConfigurationDirectory=sipproxy",
                       "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict"):
            self.assertIn(needed, unit)
        directory = tempfile.mkdtemp(prefix="unit-")
        path = os.path.join(directory, "sipproxy.service")
        with open(path, "w") as f:
            f.write(unit.replace("/opt/sipproxy/bin/twistd", os.path.realpath(twistd)))
        result = subprocess.run([analyze, "verify", path], capture_output=True, text=True, timeout=60)
        problems = [line for line in (result.stdout + result.stderr).splitlines() if "sipproxy.service" in line]
        self.assertEqual((result.returncode, problems), (0, []))
