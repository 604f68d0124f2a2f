"""The phone directory against a real slapd, through the real server's phone-facing site."""

import time
import urllib.parse
import xml.etree.ElementTree as ET

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.harness import ServerProcess
from tests.integration.slapd import BASE_DN, Slapd, person_ldif

SPECIAL = [
    ("u-joerg", "Jörg", "Müller", "4001"),
    ("u-zoe", "Zoë", "Ångström", "4002"),
    ("u-star", "Asterisk", "*Star", "4003"),
    ("u-paren", "Paren", "(Round)", "4004"),
    ("u-slash", "Back", "Slash\\Name", "4005"),
    ("u-lukasz", "Łukasz", "Kowalski", "4006"),
]


def people() -> str:
    out = []
    for i in range(40):
        out.append(person_ldif(f"smith{i}", f"Person{i:02d}", "Smith", f"30{i:02d}"))
    for i in range(154):
        out.append(person_ldif(f"p{i}", f"Given{i}", f"Family{i:03d}", f"5{i:03d}", mobile=f"6{i:03d}"))
    for uid, given, sn, phone in SPECIAL:
        out.append(person_ldif(uid, given, sn, phone))
    return "".join(out)


class DirectoryWithSlapdTests(SynchronousTestCase):
    def setUp(self):
        self.slapd = Slapd(people()).start()
        self.addCleanup(self.slapd.stop)
        self.server = ServerProcess(
            '[plugins]\nenabled = ["ldapdir"]\n[plugins.ldapdir]\n'
            f'urls = ["{self.slapd.url}"]\nbase_dn = "ou=people,{BASE_DN}"\n'
            'search_filter = "(objectClass=inetOrgPerson)"\ntimeout = 2\n'
        ).start()
        self.addCleanup(self.server.stop)

    def search(self, **query):
        headers, body = self.server.phone_get("/directory/search?" + urllib.parse.urlencode(query, encoding="latin-1"))
        return headers, ET.fromstring(body), body

    def entries(self, root):
        return [(e.find("Name").text, e.find("Telephone").text) for e in root.findall("DirectoryEntry")]

    def test_services_menu_and_form(self):
        _, body = self.server.phone_get("/services")
        menu = ET.fromstring(body)
        self.assertEqual([i.find("Name").text for i in menu.findall("MenuItem")], ["Directory"])
        _, body = self.server.phone_get("/directory")
        self.assertEqual(ET.fromstring(body).tag, "CiscoIPPhoneInput")

    def test_last_name_paged_with_refresh(self):
        headers, root, _ = self.search(last="Smith")
        self.assertEqual(root.tag, "CiscoIPPhoneDirectory")
        first_page = self.entries(root)
        self.assertEqual(len(first_page), 32)
        self.assertEqual(first_page[0], ("Person00 Smith", "3000"))
        self.assertEqual(first_page, sorted(first_page, key=lambda e: e[0].casefold()))
        self.assertEqual(headers["Content-Type"], "text/xml; charset=ISO-8859-1")
        delay, _, url = headers["Refresh"].partition("; url=")
        self.assertEqual(delay, "5")
        _, body = self.server.phone_get(url[url.index("/directory"):])
        self.assertEqual(len(self.entries(ET.fromstring(body))), 8)

    def test_first_name_with_latin1(self):
        _, root, body = self.search(first="Zo")
        self.assertEqual(self.entries(root), [("Zoë Ångström", "4002")])
        self.assertIn("Zoë Ångström".encode("latin-1"), body)
        _, root, _ = self.search(last="Kowal")
        self.assertEqual(self.entries(root), [("Lukasz Kowalski", "4006")])  # Ł is outside Latin-1: spelled L

    def test_number_prefix_over_all_number_attributes(self):
        _, root, _ = self.search(number="6012")
        self.assertEqual(self.entries(root), [("Given12 Family012", "5012"), ("Given12 Family012", "6012")])

    def test_injection_is_matched_literally(self):
        _, root, _ = self.search(last="*")
        self.assertEqual(self.entries(root), [("Asterisk *Star", "4003")])
        _, root, _ = self.search(last="(")
        self.assertEqual(self.entries(root), [("Paren (Round)", "4004")])
        _, root, _ = self.search(last="Slash\\")
        self.assertEqual(self.entries(root), [("Back Slash\\Name", "4005")])
        _, root, _ = self.search(last="*)(objectClass=*")
        self.assertEqual(root.tag, "CiscoIPPhoneText")

    def test_nothing_found(self):
        _, root, _ = self.search(last="Nobody")
        self.assertEqual((root.tag, root.find("Text").text), ("CiscoIPPhoneText", "No entries found."))

    def test_ldap_down_gives_a_clear_answer_within_the_timeout(self):
        self.search(last="Smith")  # connections are up
        self.slapd.stop()
        started = time.monotonic()
        _, root, _ = self.search(last="Smith")
        self.assertEqual(root.tag, "CiscoIPPhoneText")
        self.assertEqual(root.find("Text").text, "Directory unavailable. Please try again later.")
        self.assertLess(time.monotonic() - started, 8)  # bounded: timeout 2 s (+ one reconnect), never a hang
        _, root, _ = self.search(last="Smith")
        self.assertEqual(root.tag, "CiscoIPPhoneText")
        self.assertEqual(self.server.log().count("LDAP directory unavailable"), 1)  # once per outage


class DirectoryOverTlsTests(SynchronousTestCase):
    """LDAPS and StartTLS, verified against the configured CA and the server name."""

    def setUp(self):
        import tempfile

        from tests.integration.certs import make_self_signed

        directory = tempfile.mkdtemp()
        self.cert, key = make_self_signed(directory, "localhost")
        self.other_ca, _ = make_self_signed(tempfile.mkdtemp(), "localhost")  # a CA that did not sign slapd's cert
        self.slapd = Slapd(person_ldif("tls1", "Tess", "Tlsuser", "7001"), tls=(self.cert, key)).start()
        self.addCleanup(self.slapd.stop)

    def server_with(self, url, ca_file, starttls=False):
        server = ServerProcess(
            '[plugins]\nenabled = ["ldapdir"]\n[plugins.ldapdir]\n'
            f'urls = ["{url}"]\nbase_dn = "ou=people,{BASE_DN}"\nsearch_filter = "(objectClass=inetOrgPerson)"\n'
            f'timeout = 2\nca_file = "{ca_file}"\nstarttls = {"true" if starttls else "false"}\n').start()
        self.addCleanup(server.stop)
        _, body = server.phone_get("/directory/search?last=Tls")
        return ET.fromstring(body)

    def test_ldaps_with_the_right_ca(self):
        url = f"ldaps://localhost:{self.slapd.ldaps_port}"
        root = self.server_with(url, self.cert)
        self.assertEqual([e.find("Name").text for e in root.findall("DirectoryEntry")], ["Tess Tlsuser"])

    def test_ldaps_with_an_untrusted_certificate_is_unavailable(self):
        root = self.server_with(f"ldaps://localhost:{self.slapd.ldaps_port}", self.other_ca)
        self.assertEqual(root.find("Text").text, "Directory unavailable. Please try again later.")

    def test_starttls(self):
        root = self.server_with(f"ldap://localhost:{self.slapd.port}", self.cert, starttls=True)
        self.assertEqual([e.find("Name").text for e in root.findall("DirectoryEntry")], ["Tess Tlsuser"])
