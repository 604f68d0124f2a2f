"""A real, throwaway slapd for directory tests: own config, own mdb database, a free loopback port.

`Slapd(entries).start()` writes a slapd.conf (core, cosine, inetorgperson
schemas; mdb), loads the entries with slapadd, and runs slapd in the
foreground on ldap://127.0.0.1:<port>. `stop()` ends it; the directory goes
with the temporary folder. When CI=true a missing slapd is a failure.
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time

from tests.integration.harness import free_port, require

BASE_DN = "dc=example,dc=com"
ADMIN_DN = "cn=admin,dc=example,dc=com"
ADMIN_PASSWORD = "test-secret"

_CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {dir}/slapd.pid
sizelimit 500
database mdb
maxsize 104857600
suffix "{base}"
rootdn "{admin}"
rootpw {password}
directory {dir}/db
index objectClass eq
index cn,sn,givenName,displayName eq,sub
index telephoneNumber,mobile eq,sub
access to * by * read
"""


def ldif_escape(value: str) -> str:
    """An LDIF value line: base64 when it is not plain ASCII or starts oddly (RFC 2849)."""
    import base64

    if value and all(32 <= ord(c) < 127 for c in value) and value[0] not in " :<" and not value.endswith(" "):
        return f" {value}"
    return ": " + base64.b64encode(value.encode()).decode()


def person_ldif(uid: str, given: str, surname: str, phone: str = "", mobile: str = "") -> str:
    lines = [f"dn: uid={uid},ou=people,{BASE_DN}", "objectClass: inetOrgPerson", f"uid: {uid}",
             f"cn:{ldif_escape(f'{given} {surname}')}", f"sn:{ldif_escape(surname)}", f"givenName:{ldif_escape(given)}",
             f"displayName:{ldif_escape(f'{given} {surname}')}"]
    if phone:
        lines.append(f"telephoneNumber: {phone}")
    if mobile:
        lines.append(f"mobile: {mobile}")
    return "\n".join(lines) + "\n\n"


class Slapd:
    def __init__(self, people_ldif: str = "", tls: tuple[str, str] | None = None):
        """`tls`: (certificate, key) PEM files; slapd then also listens on ldaps:// and offers StartTLS."""
        require("slapd")
        self.dir = tempfile.mkdtemp(prefix="slapd-")
        os.makedirs(os.path.join(self.dir, "db"))
        self.port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.ldaps_port = free_port() if tls else None
        self.ldaps_url = f"ldaps://127.0.0.1:{self.ldaps_port}" if tls else None
        self.conf = os.path.join(self.dir, "slapd.conf")
        conf = _CONF.format(dir=self.dir, base=BASE_DN, admin=ADMIN_DN, password=ADMIN_PASSWORD)
        if tls:
            conf = f"TLSCertificateFile {tls[0]}\nTLSCertificateKeyFile {tls[1]}\n" + conf
        with open(self.conf, "w") as f:
            f.write(conf)
        base = (f"dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example\n\n"
                f"dn: ou=people,{BASE_DN}\nobjectClass: organizationalUnit\nou: people\n\n")
        data = os.path.join(self.dir, "data.ldif")
        with open(data, "w") as f:
            f.write(base + people_ldif)
        subprocess.run([shutil.which("slapadd") or "/usr/sbin/slapadd", "-f", self.conf, "-l", data],
                       check=True, capture_output=True, timeout=60)
        self.process = None

    def start(self, timeout: float = 15.0) -> "Slapd":
        slapd = shutil.which("slapd") or "/usr/sbin/slapd"
        urls = self.url + (f" {self.ldaps_url}" if self.ldaps_url else "")
        self.process = subprocess.Popen([slapd, "-d", "0", "-f", self.conf, "-h", urls],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        import socket

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"slapd exited: {self.process.stderr.read().decode(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError("slapd did not start listening")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
