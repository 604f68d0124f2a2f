"""The directory plugin without LDAP: filter escaping, Cisco XML output, local users, paging."""

import os
import xml.etree.ElementTree as ET

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from plugins.ldapdir.backends import build_filter, escape_filter_value
from plugins.ldapdir.config import DirectoryConfig
from plugins.ldapdir.directory import DirectoryPlugin
from proxy.errors import ConfigError
from proxy.phone import ciscoxml
from proxy.registration.credentials import FileCredentials, UserRecord, locked_users
from proxy.plugin import PluginContext


class FilterTests(SynchronousTestCase):
    def test_rfc4515_escapes(self):
        self.assertEqual(escape_filter_value("a*b(c)d\\e\x00"), "a\\2ab\\28c\\29d\\5ce\\00")

    def test_filter(self):
        config = DirectoryConfig(urls=("ldap://x",), base_dn="dc=x")
        self.assertEqual(build_filter(config, "Ann", "", ""), "(&(objectClass=person)(givenName=Ann*))")
        self.assertEqual(build_filter(config, "", "*)(uid=*", "55"),
                         "(&(objectClass=person)(sn=\\2a\\29\\28uid=\\2a*)"
                         "(|(telephoneNumber=55*)(mobile=55*)(ipPhone=55*)))")


class CiscoXmlTests(SynchronousTestCase):
    def test_latin1_transliteration_and_limits(self):
        self.assertEqual(ciscoxml.latin1("Jörg  Łukasz Ωmega", 100), "Jörg Lukasz ?mega")
        self.assertEqual(len(ciscoxml.latin1("x" * 50, ciscoxml.NAME_MAX)), 32)

    def test_documents_parse_and_escape(self):
        body = ciscoxml.directory("Dir & <Co>", "p", [("A<b> & \"c\"", "1001")] * 40)
        root = ET.fromstring(body)
        self.assertEqual(root.tag, "CiscoIPPhoneDirectory")
        self.assertEqual(root.find("Title").text, "Dir & <Co>")
        self.assertEqual(len(root.findall("DirectoryEntry")), 32)
        self.assertTrue(body.startswith(b'<?xml version="1.0" encoding="ISO-8859-1"?>'))


def render(resource, path_args: dict):
    request = DummyRequest([b""])
    request.args = {k.encode(): [v.encode("latin-1")] for k, v in path_args.items()}
    request.requestHeaders.setRawHeaders(b"host", [b"192.0.2.1:8081"])
    result = resource.render(request)
    if isinstance(result, bytes):
        return request, result
    return request, b"".join(request.written)


class LocalDirectoryTests(SynchronousTestCase):
    def setUp(self):
        state = self.mktemp()
        path = os.path.join(state, "users.json")
        with locked_users(path) as users:
            for i in range(40):
                users[f"2{i:03d}"] = UserRecord(f"2{i:03d}", "r", "0" * 32, display_name=f"Person{i:02d} Smith")
            users["1001"] = UserRecord("1001", "r", "0" * 32, display_name="Jörg Müller")
        credentials = FileCredentials(path, Clock())
        context = PluginContext(clock=Clock(), reactor=Clock(), config=None, credentials=credentials)
        self.plugin = DirectoryPlugin(DirectoryConfig(), context)
        self.pages = self.plugin.phone_resources()[b"directory"]

    def search(self, **args):
        resource = self.pages.getChildWithDefault(b"search", DummyRequest([b"search"]))
        return render(resource, args)

    def test_form(self):
        request, body = render(self.pages, {})
        root = ET.fromstring(body)
        self.assertEqual(root.tag, "CiscoIPPhoneInput")
        self.assertEqual([i.find("InputFlags").text for i in root.findall("InputItem")], ["A", "A", "N"])
        self.assertEqual(root.find("URL").text, "http://192.0.2.1:8081/directory/search")

    def test_search_by_first_name_latin1(self):
        request, body = self.search(first="Jö")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [ciscoxml.CONTENT_TYPE])
        root = ET.fromstring(body)
        self.assertEqual([(e.find("Name").text, e.find("Telephone").text) for e in root.findall("DirectoryEntry")],
                         [("Jörg Müller", "1001")])
        self.assertIn("Jörg".encode("latin-1"), body)

    def test_paging_with_refresh(self):
        request, body = self.search(last="Smith")
        self.assertEqual(len(ET.fromstring(body).findall("DirectoryEntry")), 32)
        (refresh,) = request.responseHeaders.getRawHeaders(b"refresh")
        self.assertEqual(refresh, b"5; url=http://192.0.2.1:8081/directory/search?first=&last=Smith&number=&page=2")
        request, body = self.search(last="Smith", page="2")
        self.assertEqual(len(ET.fromstring(body).findall("DirectoryEntry")), 8)
        self.assertIsNone(request.responseHeaders.getRawHeaders(b"refresh"))

    def test_nothing_found(self):
        _, body = self.search(number="999")
        root = ET.fromstring(body)
        self.assertEqual((root.tag, root.find("Text").text), ("CiscoIPPhoneText", "No entries found."))

    def test_services_menu_entry(self):
        self.assertEqual(self.plugin.services_menu(), [("Directory", "/directory")])

    def test_odd_page_numbers_are_page_one_never_a_500(self):
        for raw in (b"\xc2\xb2", b"-1", b"0", b"99999999999999999999", b"\xff", b"1e3", b" 2"):
            with self.subTest(raw):
                resource = self.pages.getChildWithDefault(b"search", DummyRequest([b"search"]))
                request = DummyRequest([b""])
                request.args = {b"last": [b"a"], b"page": [raw]}
                request.requestHeaders.setRawHeaders(b"host", [b"192.0.2.1:8081"])
                result = resource.render(request)
                body = result if isinstance(result, bytes) else b"".join(request.written)
                self.assertIn(ET.fromstring(body).tag, ("CiscoIPPhoneDirectory", "CiscoIPPhoneText"))

    def test_result_pages_are_not_cached_and_numbers_are_rewritten_to_dial(self):
        request, body = self.search(first="Jö")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"expires"), [b"-1"])
        context = PluginContext(clock=Clock(), reactor=Clock(), config=None, credentials=self.plugin.context.credentials)
        plugin = DirectoryPlugin(DirectoryConfig(number_rewrites=(("1(\\d+)", "9301\\1"), ("2(\\d+)", "\\1"))), context)
        self.assertEqual([plugin.dialable(n) for n in ("1001", "2012", "3003")], ["9301001", "012", "3003"])
        search = plugin.phone_resources()[b"directory"].getChildWithDefault(b"search", DummyRequest([b"search"]))
        _, body = render(search, {"first": "Jö"})
        self.assertEqual([e.find("Telephone").text for e in ET.fromstring(body).findall("DirectoryEntry")],
                         ["9301001"])

    def test_manual_paging_and_rewrite_rules_are_checked(self):
        from plugins.ldapdir.config import parse

        self.assertEqual(parse({"page_refresh": 0}, "s.toml").page_refresh, 0)
        for bad in ([["(", "x"]], [["a"]], "x", [["(a)", "\\2"]]):
            with self.subTest(bad):
                e = self.assertRaises(ConfigError, parse, {"number_rewrites": bad}, "s.toml")
                self.assertEqual(e.key, "plugins.ldapdir.number_rewrites")
