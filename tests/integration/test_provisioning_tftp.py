"""Provisioning in the real server: real TFTP clients (tftp-hpa, atftp, tftpy) fetch what `phone add` wrote,
traversal is refused, and a simulated phone (the seed's hunt order over TFTP, then SIPp registering with a
User-Agent naming its image) goes through a two-step `upgrade run` end to end."""

import json
import os
import subprocess
import tempfile
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.harness import ServerProcess, SippPeer, free_port, require, run_sipp, sipp_errors

MAC = "003094C25D2E"
UA = {"P0S3-06-3-00": "Cisco-SIPIPPhone/6.3", "P0S3-07-5-00": "Cisco-SIPIPPhone/7.5",
      "P0S3-08-12-00": "Cisco-CP7960G/8.12"}


def tftpy():
    try:
        import tftpy as module
    except ImportError:
        if os.environ.get("CI") == "true":
            raise AssertionError("tftpy is not installed; the test extras must bring it") from None
        raise SkipTest("tftpy is not installed")
    import logging

    logging.getLogger("tftpy").setLevel(logging.CRITICAL)
    return module


class ProvisionedServer(SynchronousTestCase):
    image = "P0S3-08-12-00"

    def setUp(self):
        self.tftp_port = free_port()
        self.root = tempfile.mkdtemp(prefix="tftp-")
        self.server = ServerProcess(
            f'[checksync]\ntftp_root = "{self.root}"\nrate = 5\n'
            '[plugins]\nenabled = ["provisioning"]\n'
            f'[plugins.provisioning]\ntftp_listen = "udp:{self.tftp_port}:interface=127.0.0.1"\n'
            f'image_version = "{self.image}"\n')
        self.server.admin("phone", "add", f"SEP{MAC}", "--model", "7960", "--lines", "1001", "--label", "Ann")
        self.server.start()
        self.addCleanup(self.server.stop)

    def fetch(self, name: str, **options) -> bytes:
        client = tftpy().TftpClient("127.0.0.1", self.tftp_port, options=options)
        target = os.path.join(tempfile.mkdtemp(), "got")
        client.download(name, target, timeout=2)
        with open(target, "rb") as f:
            return f.read()

    def missing(self, name: str) -> bool:
        try:
            self.fetch(name)
        except Exception as e:  # tftpy raises TftpException with the server's error
            return "File not found" in str(e) or "not found" in str(e).lower()
        return False

    def on_disk(self, name: str) -> bytes:
        with open(os.path.join(self.root, name), "rb") as f:
            return f.read()


class TftpClientTests(ProvisionedServer):
    def test_real_clients_fetch_what_phone_add_wrote(self):
        image = os.urandom(200_000)
        with open(os.path.join(self.root, "P0S3-08-12-00.sb2"), "wb") as f:
            f.write(image)
        # tftp-hpa, octet mode
        out = os.path.join(tempfile.mkdtemp(), "SIP.cnf")
        result = subprocess.run([require("tftp"), "-m", "binary", "127.0.0.1", str(self.tftp_port), "-c", "get",
                                 f"SIP{MAC}.cnf", out], capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), self.on_disk(f"SIP{MAC}.cnf"))
        # atftp with blksize and tsize (RFC 2348, 2349), a file of many blocks
        out = os.path.join(tempfile.mkdtemp(), "image")
        result = subprocess.run([require("atftp"), "--option", "blksize 1428", "--option", "tsize 0", "-g", "-r",
                                 "P0S3-08-12-00.sb2", "-l", out, "127.0.0.1", str(self.tftp_port)],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), image)
        # tftpy as a client, with the smallest block size the RFC allows
        self.assertEqual(self.fetch("SIPDefault.cnf", blksize=8, tsize=0), self.on_disk("SIPDefault.cnf"))
        self.assertIn(b'image_version: "P0S3-08-12-00"', self.on_disk("SIPDefault.cnf"))

    def test_phone_import_for_a_site(self):
        csv_path = os.path.join(tempfile.mkdtemp(), "phones.csv")
        with open(csv_path, "w") as f:
            f.write("mac,model,lines,label\n00:30:94:00:00:01,7940,2001;2002,Lobby\n003094000002,7960,2003\n")
        out = self.server.admin("phone", "import", csv_path).stdout
        self.assertIn("provisioned SEP003094000001: 2001, 2002 (new passwords: 2001, 2002)", out)
        listed = json.loads(self.server.admin("phone", "list", "--json").stdout)
        self.assertEqual([(p["device"], p["lines"]) for p in listed],
                         [("SEP003094000001", ["2001", "2002"]), ("SEP003094000002", ["2003"]), (f"SEP{MAC}", ["1001"])])
        self.assertIn(b'line2_name: "2002"', self.fetch("SIP003094000001.cnf"))
        bad = os.path.join(tempfile.mkdtemp(), "bad.csv")
        with open(bad, "w") as f:
            f.write("003094000003,7970,2004\n")
        refused = self.server.admin("phone", "import", bad, check=False)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("row 1: model '7970' (7940 or 7960)", refused.stderr)

    def test_traversal_is_refused(self):
        for name in ("../etc/passwd", "/etc/passwd", "%2e%2e/etc/passwd", "..\\etc\\passwd", "sub/../../etc/passwd"):
            result = subprocess.run([require("tftp"), "127.0.0.1", str(self.tftp_port), "-c", "get", name,
                                     os.path.join(tempfile.mkdtemp(), "x")], capture_output=True, text=True,
                                    timeout=30)
            self.assertRegex(result.stdout + result.stderr, r"Error code [12]:", name)
        log = json.loads(self.server.admin("tftp", "log", "--json").stdout)
        results = [r["result"] for record in log.values() for r in record["requests"]]
        self.assertEqual(len(results), 5)
        self.assertTrue(all(r == "not found" or r.startswith("refused") for r in results), results)

    def test_log_explains_a_looping_loader(self):
        for _ in range(7):
            self.assertTrue(self.missing(f"CTLSEP{MAC}.tlv"))
        text = self.server.admin("tftp", "log", "--phone", f"SEP{MAC}").stdout
        self.assertIn(f"CTLSEP{MAC}.tlv: not found", text)
        self.assertIn("the loader is looping on its certificate trust list (seed 003)", text)

    def test_lint_of_the_written_root(self):
        result = self.server.admin("tftp", "lint", check=False)
        # Nothing is wrong with what sipproxy wrote; only the image package is missing.
        self.assertEqual(result.returncode, 1)
        lines = [line for line in result.stdout.splitlines() if ": error: " in line or ": warning: " in line]
        self.assertTrue(lines and all("is not in the TFTP root" in line or "are not in the TFTP root" in line
                                      for line in lines), result.stdout)


class SimulatedPhone:
    """A 7960 as the seeds describe its boot: the loader's hunt order over TFTP (seed 002 line 100), its image
    from SIP<MAC>.cnf over SIPDefault.cnf (seed 001 line 1013), the image files fetched when it changes,
    then a REGISTER per line (SIPp) with a User-Agent naming the image it runs."""

    def __init__(self, test: ProvisionedServer, image: str, password: str):
        self.test = test
        self.image = image
        self.password = password
        self.port = free_port()
        self.fetched: list[str] = []

    def boot(self) -> None:
        t = self.test
        for name in (f"CTLSEP{MAC}.tlv", f"SEP{MAC}.cnf.xml"):
            t.missing(name) or self.fetched.append(name)
        mine = t.fetch(f"SIP{MAC}.cnf").decode()
        shared = t.fetch("SIPDefault.cnf").decode()
        self.fetched += [f"SIP{MAC}.cnf", "SIPDefault.cnf"]
        wanted = _image_version(mine) or _image_version(shared)
        if wanted and wanted != self.image:
            for suffix in (".loads", ".sb2"):
                t.fetch(wanted + suffix)  # raises when it is not there: the phone would be stuck
            self.image = wanted
        self.register()

    def register(self) -> None:
        result = run_sipp("register_ua.xml", self.test.server.port, local_port=self.port,
                          injection=[("1001", "localhost", "3600", UA[self.image])],
                          extra=["-au", "1001", "-ap", self.password])
        self.test.assertEqual(result.returncode, 0, sipp_errors(result) + self.test.server.log()[-3000:])

    def take_notify(self) -> SippPeer:
        peer = SippPeer("phone_checksync.xml", self.test.server.port, port=self.port, timeout=40)
        self.test.addCleanup(peer.stop)
        return peer


def _image_version(text: str) -> str:
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() == "image_version":
            return value.split(";")[0].strip().strip('"')
    return ""


class UpgradeRunTests(ProvisionedServer):
    image = "P0S3-06-3-00"  # what SIPDefault.cnf says: the fleet's image today

    def test_two_step_upgrade_end_to_end(self):
        for image in ("P0S3-07-5-00", "P0S3-08-12-00"):
            for suffix in (".loads", ".sb2"):
                with open(os.path.join(self.root, image + suffix), "wb") as f:
                    f.write(os.urandom(30_000))
        shown = json.loads(self.server.admin("phone", "show", f"SEP{MAC}", "--passwords", "--json").stdout)
        phone = SimulatedPhone(self, "P0S3-06-3-00", shown["passwords"]["1001"])
        phone.boot()
        self.assertEqual(phone.fetched[:3], [f"SEP{MAC}.cnf.xml", f"SIP{MAC}.cnf", "SIPDefault.cnf"])
        planned = self.server.admin("upgrade", "plan", "--to", "P0S3-08-12-00").stdout
        self.assertIn("P0S3-07-5-00 -> P0S3-08-12-00", planned)
        notify = phone.take_notify()
        self.server.admin("upgrade", "run", "--to", "P0S3-08-12-00", "--timeout", "60")
        for step in ("P0S3-07-5-00", "P0S3-08-12-00"):
            self.assertEqual(notify.wait(), 0, notify.errors() + self.server.log()[-3000:])
            with open(os.path.join(self.root, f"SIP{MAC}.cnf")) as f:
                self.assertIn(f'image_version: "{step}"', f.read())
            with open(os.path.join(self.root, "SIPDefault.cnf")) as f:
                self.assertIn('image_version: "P0S3-06-3-00"', f.read())  # the others are not touched
            if step != "P0S3-08-12-00":
                phone.boot()
                notify = phone.take_notify()  # the next step's NOTIFY
            else:
                phone.boot()
            self.assertEqual(phone.image, step)
        status = self._wait_done()
        (row,) = status["phones"]
        self.assertEqual((row["state"], row["detail"], status["summary"]), ("done", "on P0S3-08-12-00", {"done": 1}))
        self.assertIn("done", self.server.admin("upgrade", "status").stdout)

    def test_a_target_below_5x_from_a_signed_image_is_refused(self):
        out = self.server.admin("upgrade", "plan", "--to", "P0S3-04-4-00", "--from", "P0S3-06-3-00").stdout
        self.assertIn("refused: P0S3-06-3-00 is a signed image", out)
        out = self.server.admin("upgrade", "plan", "--to", "P0S3-08-12-00", "--from", "P0S30200").stdout
        self.assertIn("P0S30203 -> P0S3-04-4-00 -> P0S3-05-1-00 -> P0S3-06-3-00 -> P0S3-07-5-00 -> P0S3-08-12-00", out)
        self.assertIn("needs in", out)

    def _wait_done(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = json.loads(self.server.admin("upgrade", "status", "--json").stdout)
            if run and run["done"]:
                return run
            time.sleep(0.5)
        self.fail(f"the upgrade did not finish: {run}\n{self.server.log()[-3000:]}")
