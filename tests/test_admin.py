"""The admin CLI on real files, and the admin API resource with its token."""

import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from proxy.admin.cli import api_base, main
from proxy.admin.api import AdminApi, load_or_create_token
from proxy.registration.credentials import compute_ha1, read_users
from proxy.registration.location import Binding, SqliteLocationService


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


class UserCommandTests(SynchronousTestCase):
    def setUp(self):
        self.state = os.path.abspath(self.mktemp())
        self.config = os.path.join(os.path.dirname(self.state), "site.toml")
        os.makedirs(os.path.dirname(self.state), exist_ok=True)
        with open(self.config, "w") as f:
            f.write(f'[server]\ndomains = ["pbx.example.com"]\nstate_dir = "{self.state}"\n')

    def users(self):
        return read_users(os.path.join(self.state, "users.json"))

    def test_add_stores_ha1_only_with_mode_0600(self):
        code, out, _ = run("-c", self.config, "user", "add", "1001", "--password", "s3cret", "--display-name", "Ann Example")
        self.assertEqual((code, out), (0, "added 1001\n"))
        user = self.users()["1001"]
        self.assertEqual(user.ha1, compute_ha1("1001", "pbx.example.com", "s3cret"))
        path = os.path.join(self.state, "users.json")
        with open(path) as f:
            self.assertNotIn("s3cret", f.read())
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)

    def test_passwd_remove_list(self):
        run("-c", self.config, "user", "add", "1001", "--password", "a")
        run("-c", self.config, "user", "add", "1002", "--password", "b", "--display-name", "Bo")
        self.assertEqual(run("-c", self.config, "user", "passwd", "1001", "--password", "c")[0], 0)
        self.assertEqual(self.users()["1001"].ha1, compute_ha1("1001", "pbx.example.com", "c"))
        code, out, _ = run("-c", self.config, "user", "list", "--json")
        self.assertEqual([u["name"] for u in json.loads(out)], ["1001", "1002"])
        self.assertEqual(run("-c", self.config, "user", "remove", "1001")[0], 0)
        self.assertEqual(list(self.users()), ["1002"])

    def test_remove_takes_bindings_and_forwarding_with_it_when_the_server_is_down(self):
        from proxy.routing.forwarding import ForwardingStore

        run("-c", self.config, "user", "add", "1001", "--password", "a", "--lines", "1009")
        run("-c", self.config, "forward", "set", "1001", "--always", "1002")
        location = SqliteLocationService(os.path.join(self.state, "location.sqlite"), Clock())
        for user in ("1001", "1009"):
            location.save(Binding(aor=f"sip:{user}@pbx.example.com", contact=f"sip:{user}@192.0.2.5:5060",
                                  expires_at=4_000_000_000, source_host="192.0.2.5", source_port=5060))
        location.stop()
        code, out, _ = run("-c", self.config, "user", "remove", "1001")
        self.assertEqual(code, 0)
        self.assertIn("forwarding of 1001 cleared", out)
        self.assertIn("1 binding(s) of sip:1001@pbx.example.com removed", out)
        self.assertIn("1 binding(s) of sip:1009@pbx.example.com removed", out)
        location = SqliteLocationService(os.path.join(self.state, "location.sqlite"), Clock())
        self.assertEqual(location.all_bindings(), [])
        location.stop()
        self.assertTrue(ForwardingStore(os.path.join(self.state, "location.sqlite")).get("1001").is_empty())

    def test_import_checks_every_row_before_writing(self):
        csv_path = os.path.join(os.path.dirname(self.state), "phones.csv")
        with open(csv_path, "w") as f:
            f.write("name,password,display name,lines\n1001,pw1,Ann Example,1005;1006\n1002,pw2,\n# a comment\n")
        code, out, _ = run("-c", self.config, "user", "import", csv_path)
        self.assertEqual((code, out), (0, "imported 2 user(s): 2 added, 0 updated\n"))
        users = self.users()
        self.assertEqual(users["1001"].ha1, compute_ha1("1001", "pbx.example.com", "pw1"))
        self.assertEqual((users["1001"].display_name, users["1001"].lines), ("Ann Example", ("1005", "1006")))
        with open(csv_path, "w") as f:
            f.write("1003,pw3\n1001,new\n")
        code, _, err = run("-c", self.config, "user", "import", csv_path)
        self.assertEqual(code, 1)
        self.assertIn("users exist already: 1001 (--update sets their passwords)", err)
        self.assertNotIn("1003", self.users())  # nothing written
        with open(csv_path, "w") as f:
            f.write("1003,pw3\nbad name,x\n")
        self.assertIn("row 2: 'bad name' cannot be a user name", run("-c", self.config, "user", "import", csv_path)[2])
        self.assertEqual(run("-c", self.config, "user", "import", "--update", csv_path)[0], 1)

    def test_check_config_reads_plugin_tables_too(self):
        self.assertEqual(run("-c", self.config, "check-config")[0], 0)
        with open(self.config, "a") as f:
            f.write('[plugins]\nenabled = ["ldapdir"]\n[plugins.ldapdir]\nnot_a_key = 1\n')
        code, _, err = run("-c", self.config, "check-config")
        self.assertEqual(code, 1)
        self.assertIn("plugins.ldapdir", err)

    def test_lines(self):
        run("-c", self.config, "user", "add", "1001", "--password", "a", "--lines", "1002,1003")
        self.assertEqual(self.users()["1001"].lines, ("1002", "1003"))
        self.assertEqual(run("-c", self.config, "user", "lines", "1001", "1004")[1], "1001 may register: 1001, 1004\n")
        run("-c", self.config, "user", "passwd", "1001", "--password", "b")
        self.assertEqual(self.users()["1001"].lines, ("1004",))
        run("-c", self.config, "user", "lines", "1001")
        self.assertEqual(self.users()["1001"].lines, ())

    def test_errors_are_clear(self):
        run("-c", self.config, "user", "add", "1001", "--password", "a")
        err = run("-c", self.config, "user", "add", "1001", "--password", "a")[2]
        self.assertEqual(err.splitlines()[-1], "sipproxy-admin: user 1001 exists; use 'user passwd'")
        self.assertEqual(err.splitlines()[0], f"(state directory {self.state})")
        self.assertIn("no user 9", run("-c", self.config, "user", "remove", "9")[2])
        self.assertIn("cannot be a user name", run("-c", self.config, "user", "add", "a b", "--password", "x")[2])
        self.assertIn("UNPROVISIONED", run("-c", self.config, "user", "add", "UNPROVISIONED", "--password", "x")[2])

    def test_bad_config_names_file_and_key(self):
        with open(self.config, "a") as f:
            f.write("[registrar]\nmin_expires = 0\n")
        code, _, err = run("-c", self.config, "user", "list")
        self.assertEqual(code, 1)
        self.assertIn("registrar.min_expires: must be at least 1", err)

    def test_registrations_when_server_is_down(self):
        load_or_create_token(self.state)
        with open(self.config, "a") as f:
            f.write('[admin]\nlisten = "tcp:1:interface=127.0.0.1"\n')
        code, _, err = run("-c", self.config, "registrations")
        self.assertEqual(code, 1)
        self.assertIn("cannot reach the server's admin API at http://127.0.0.1:1", err)

    def test_api_base(self):
        self.assertEqual(api_base("tcp:8060:interface=127.0.0.1"), "http://127.0.0.1:8060")
        self.assertEqual(api_base("tcp:port=9000"), "http://127.0.0.1:9000")
        self.assertEqual(api_base("tcp6:8060:interface=\\:\\:1".replace("\\", "")), "http://127.0.0.1:8060")


class AdminApiTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.state = self.mktemp()
        self.token = load_or_create_token(self.state)
        self.location = SqliteLocationService(os.path.join(self.state, "loc.sqlite"), self.clock)
        self.location.save(Binding(aor="sip:1001@example.com", contact="sip:1001@192.0.2.5:5060", expires_at=1600,
                                   source_host="192.0.2.5", source_port=5060, user_agent="Cisco-SIPIPPhone/7.5",
                                   instance="<urn:uuid:00000000-0000-0000-0000-003094c25d2e>"))
        self.api = AdminApi(self.token, self.clock, self.location, domain="example.com")

    def get(self, path, token=None, method=b"GET"):
        from twisted.web.resource import getChildForRequest

        request = DummyRequest([segment.encode() for segment in path.strip("/").split("/")])
        request.method = method
        if token:
            request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {token}".encode()])
        resource = getChildForRequest(self.api, request)  # consumes the path as twisted.web does
        body = resource.render(request)
        return request.responseCode or 200, json.loads(body)

    def test_token_required(self):
        self.assertEqual(self.get("/api/registrations")[0], 401)
        self.assertEqual(self.get("/api/registrations", "wrong")[0], 401)
        self.assertEqual(os.stat(os.path.join(self.state, "admin-token")).st_mode & 0o777, 0o600)

    def test_unregister_removes_every_binding_of_an_aor(self):
        self.location.save(Binding(aor="sip:1003@example.com", contact="sip:1003@192.0.2.9:5060",
                                   expires_at=4_000_000_000, source_host="192.0.2.9", source_port=5060))
        status, body = self.get("/api/registrations/1003", self.token, method=b"DELETE")
        self.assertEqual((status, body), (200, {"aor": "sip:1003@example.com", "removed": 1}))
        self.assertEqual(self.location.lookup("sip:1003@example.com"), [])
        status, _ = self.get("/api/registrations/1003", None, method=b"DELETE")
        self.assertEqual(status, 401)

    def test_registrations(self):
        status, body = self.get("/api/registrations", self.token)
        self.assertEqual(status, 200)
        (row,) = body["registrations"]
        self.assertEqual((row["aor"], row["expires_in"], row["source"], row["user_agent"], row["mac"]),
                         ("sip:1001@example.com", 600, "192.0.2.5:5060", "Cisco-SIPIPPhone/7.5", "003094C25D2E"))

    def test_token_is_stable_across_restarts(self):
        self.assertEqual(load_or_create_token(self.state), self.token)


class ForwardCommandTests(SynchronousTestCase):
    def setUp(self):
        self.state = os.path.abspath(self.mktemp())
        self.config = os.path.join(os.path.dirname(self.state), "site.toml")
        os.makedirs(os.path.dirname(self.state), exist_ok=True)
        with open(self.config, "w") as f:
            f.write(f'[server]\nstate_dir = "{self.state}"\n')

    def test_set_show_clear(self):
        code, out, _ = run("-c", self.config, "forward", "set", "1007", "--always", "1002")
        self.assertEqual((code, out), (0, "1007: always -> 1002\n"))
        run("-c", self.config, "forward", "set", "1007", "--busy", "1003", "--no-answer", "1003", "--after", "15")
        code, out, _ = run("-c", self.config, "forward", "show", "1007", "--json")
        (row,) = json.loads(out)
        self.assertEqual((row["always"], row["busy"], row["no_answer"], row["no_answer_after"]), ("1002", "1003", "1003", 15))
        self.assertEqual(run("-c", self.config, "forward", "clear", "1007", "--always")[1],
                         "1007: busy -> 1003; no answer (15 s) -> 1003\n")
        run("-c", self.config, "forward", "clear", "1007")
        self.assertEqual(run("-c", self.config, "forward", "show")[1], "")

    def test_bad_target(self):
        code, _, err = run("-c", self.config, "forward", "set", "1007", "--always", "not a target")
        self.assertEqual(code, 1)
        self.assertIn("is not a number, user or SIP URI", err)

    def test_nothing_to_set(self):
        self.assertIn("say what to set", run("-c", self.config, "forward", "set", "1007")[2])


class ForwardingApiTests(SynchronousTestCase):
    def setUp(self):
        from proxy.routing.forwarding import ForwardingStore

        clock = Clock()
        state = self.mktemp()
        self.token = load_or_create_token(state)
        self.store = ForwardingStore(os.path.join(state, "loc.sqlite"))
        location = SqliteLocationService(os.path.join(state, "loc.sqlite"), clock)
        self.api = AdminApi(self.token, clock, location, self.store)

    def call(self, method, path, body=None):
        request = DummyRequest([p.encode() for p in path.strip("/").split("/")])
        request.method = method.encode()
        request.requestHeaders.setRawHeaders(b"authorization", [f"Bearer {self.token}".encode()])
        if body is not None:
            request.content = io.BytesIO(json.dumps(body).encode())
        resource = self.api
        while request.postpath and not getattr(resource, "isLeaf", False):
            segment = request.postpath.pop(0)
            request.prepath.append(segment)
            resource = resource.getChildWithDefault(segment, request)
        out = resource.render(request)
        return request.responseCode or 200, json.loads(out)

    def test_put_get_delete(self):
        status, body = self.call("PUT", "/api/forwarding/1007", {"busy": "1003", "no_answer_after": 30})
        self.assertEqual((status, body["busy"], body["no_answer_after"]), (200, "1003", 30))
        self.assertEqual(self.store.get("1007").busy, "1003")
        self.assertEqual(self.call("GET", "/api/forwarding")[1]["forwarding"][0]["user"], "1007")
        self.assertEqual(self.call("PUT", "/api/forwarding/1007", {"bogus": 1})[0], 400)
        self.assertEqual(self.call("DELETE", "/api/forwarding/1007")[1]["busy"], "")
