"""The deployment kit: etc/sipproxy.service is a unit systemd accepts (issue 20)."""

import os
import shutil
import subprocess
import sys
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


class FreshHostTests(SynchronousTestCase):
    """The README's first command on hosts that have no address for phones, or one (issue 20).

    Each runs in a network namespace of its own (root: `unshare --net`), so the sample config's
    ports are free and the host's real addresses are out of sight, as on a fresh VM whose hostname
    resolves to 127.0.1.1 only.
    """

    def run_in_namespace(self, setup: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
        unshare, ip = shutil.which("unshare"), shutil.which("ip")
        if os.geteuid() != 0 or unshare is None or ip is None:
            if os.environ.get("CI") == "true":
                raise AssertionError("CI must run as root with unshare and ip (util-linux, iproute2)")
            raise SkipTest("needs root, unshare and ip")
        state = tempfile.mkdtemp(prefix="fresh-host-")
        config = os.path.join(state, "sipproxy.toml")
        with open(os.path.join(REPO, "etc", "sipproxy.toml")) as f:
            sample = f.read()
        with open(config, "w") as f:  # the sample as shipped; only its state directory is this test's
            f.write(sample.replace('state_dir = "state"', f'state_dir = "{state}/state"'))
        probe = os.path.join(state, "probe.py")
        with open(probe, "w") as f:  # one OPTIONS to the sample's port 5060; prints the status line
            f.write("import socket\n"
                    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(1)\ns.bind(('127.0.0.1', 0))\n"
                    "m = ('OPTIONS sip:127.0.0.1 SIP/2.0\\r\\nVia: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bKf;rport\\r\\n'\n"
                    "     'From: <sip:a@b>;tag=1\\r\\nTo: <sip:127.0.0.1>\\r\\nCall-ID: fresh\\r\\nCSeq: 1 OPTIONS\\r\\n'\n"
                    "     'Max-Forwards: 70\\r\\nContent-Length: 0\\r\\n\\r\\n') % s.getsockname()[1]\n"
                    "s.sendto(m.encode(), ('127.0.0.1', 5060))\n"
                    "print(s.recv(65535).split(b'\\r\\n')[0].decode())\n")
        script = (f"{setup}\n"
                  f"{sys.executable} -c 'from twisted.scripts.twistd import run; run()' -n --pidfile= --logfile=- "
                  f"sipproxy --config {config} & server=$!\n"
                  f"for i in $(seq 50); do sleep 0.2; kill -0 $server 2>/dev/null || break; "
                  f"{sys.executable} {probe} 2>/dev/null && break; done\n"
                  "kill $server 2>/dev/null; wait $server; echo exit=$?\n")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([unshare, "--net", "sh", "-c", script], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=state)

    def test_no_address_for_phones_stops_startup_saying_what_to_set(self):
        result = self.run_in_namespace("ip link set lo up")
        self.assertNotIn("SIP/2.0 200", result.stdout)
        self.assertIn("proxy.advertise", result.stdout + result.stderr)
        self.assertIn("the address the phones reach this proxy at", result.stdout + result.stderr)

    def test_a_routable_address_is_found_and_named(self):
        # A host address and a default route (on lo: a namespace has no other device without kernel modules).
        setup = "ip link set lo up && ip addr add 10.99.0.7/32 dev lo && ip route add default dev lo src 10.99.0.7"
        result = self.run_in_namespace(setup)
        self.assertIn("SIP/2.0 200 OK", result.stdout, result.stdout[-3000:] + result.stderr[-2000:])
        self.assertIn("Advertising 10.99.0.7 in Via and Record-Route: the source address of the default route",
                      result.stdout)
