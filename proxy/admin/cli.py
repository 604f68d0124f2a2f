"""`sipproxy-admin`: the administrator's command line.

It reads the same TOML as the server (`-c FILE`, or $SIPPROXY_CONFIG, or
the embedded defaults) to find the state directory, the realm and the admin
API. Users are edited in the users file directly (safe: locked, atomic, and
the running server reloads it); what needs the running server
(registrations) goes through the admin API with the token from the state
directory.
"""

import argparse
import getpass
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import attrs

from proxy import __version__
from proxy.admin.api import TOKEN_FILE
from proxy.config import ProxyConfig, load_config
from proxy.registration.credentials import USERS_FILE, UserFileError, UserRecord, compute_ha1, locked_users, read_users, valid_user_name
from proxy.errors import CommandError, ConfigError
from proxy.registration.location import LOCATION_FILE, SqliteLocationService
from proxy.redis.client import RedisUnavailable
from proxy.routing.forwarding import ForwardingError, ForwardSettings, ForwardingStore, check_target


class AdminError(Exception):
    """Printed as `sipproxy-admin: <message>`, exit status 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sipproxy-admin",
        description="Administer a sipproxy server: users, registrations, call forwarding, phones and reboots.",
    )
    parser.add_argument("--version", action="version", version=f"sipproxy {__version__}")
    parser.add_argument("-c", "--config", default=os.environ.get("SIPPROXY_CONFIG"),
                        help="the server's TOML configuration (default: $SIPPROXY_CONFIG, else built-in defaults)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    user = commands.add_parser("user", help="add, change, remove and list users")
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = user_commands.add_parser("add", help="add a user (password prompted unless --password)")
    add.add_argument("name")
    add.add_argument("--password", help="for scripts; prompted when left out")
    add.add_argument("--display-name", default="", help="shown in the phone directory")
    add.add_argument("--lines", default="", help="other lines these credentials may register, comma-separated "
                     "(a phone authenticates lines 2-6 with line 1's authname when theirs is not set)")
    passwd = user_commands.add_parser("passwd", help="set a user's password")
    passwd.add_argument("name")
    passwd.add_argument("--password")
    lines = user_commands.add_parser("lines", help="set the other lines a user's credentials may register")
    lines.add_argument("name")
    lines.add_argument("line", nargs="*", help="line names; none clears the list")
    uset = user_commands.add_parser("set", help="change a user's display name or dial classes")
    uset.add_argument("name")
    uset.add_argument("--display-name", help="shown in the phone directory")
    uset.add_argument("--classes", help="the dial classes the user may call, comma-separated (the policy plugin's "
                      "[plugins.policy.classes]); '' goes back to the [plugins.policy.allow] default")
    remove = user_commands.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    listing = user_commands.add_parser("list", help="list users")
    listing.add_argument("--json", action="store_true")
    importing = user_commands.add_parser("import", help="add users from a CSV file: name,password[,display name[,lines]]")
    importing.add_argument("file", help="CSV, one user a row; lines separated by ';' or spaces; '-' reads stdin")
    importing.add_argument("--update", action="store_true", help="set the password of users that exist already")

    forward = commands.add_parser("forward", help="set, clear and show users' call forwarding")
    forward_commands = forward.add_subparsers(dest="forward_command", metavar="ACTION", required=True)
    fset = forward_commands.add_parser("set", help="set forwarding for a user")
    fset.add_argument("user")
    fset.add_argument("--always", help="forward every call to this number/user/URI")
    fset.add_argument("--busy", help="forward when the user is busy (486/600)")
    fset.add_argument("--no-answer", help="forward when the user does not answer in time")
    fset.add_argument("--after", type=int, help="seconds to ring before --no-answer applies (default 20)")
    fset.add_argument("--unavailable", help="forward when the user has no registered phone")
    fclear = forward_commands.add_parser("clear", help="clear a user's forwarding (all of it, or the kinds named)")
    fclear.add_argument("user")
    for kind in ("always", "busy", "no-answer", "unavailable"):
        fclear.add_argument(f"--{kind}", action="store_true")
    fshow = forward_commands.add_parser("show", help="show forwarding (of one user, or of everyone who has some)")
    fshow.add_argument("user", nargs="?")
    fshow.add_argument("--json", action="store_true")

    phones = commands.add_parser("phones", help="list the phones known from their registrations (one row each)")
    phones.add_argument("--json", action="store_true")
    phones.add_argument("--firmware", help="glob on the firmware version or image, e.g. '7.*' or 'P0S3-07*'")
    phones.add_argument("--model", help="7940 or 7960")
    phones.add_argument("--where", help="firmware<8.0, firmware>=7.4, model=7940")

    for name, help_text in (("reboot", "reboot phones: new SYNC in syncinfo.xml, then a paced check-sync NOTIFY each"),
                            ("push-dialplan", "make phones fetch dialplan.xml (check-sync NOTIFY, no reboot)")):
        cmd = commands.add_parser(name, help=help_text)
        cmd.add_argument("lines", nargs="*", help="line (user) names whose phones to reach")
        cmd.add_argument("--phone", action="append", default=[], help="a phone: SEP<MAC> or address:port")
        cmd.add_argument("--all", action="store_true", help="every registered phone")
        cmd.add_argument("--firmware", help="only phones whose firmware matches this glob")
        cmd.add_argument("--model", help="only this model")
        cmd.add_argument("--where", help="only phones where: firmware<8.0, model=7940 ...")
        cmd.add_argument("--rate", type=float, help="NOTIFYs per second (default from the config, 1)")
        cmd.add_argument("--dry-run", action="store_true", help="show what would be sent, send nothing")
        cmd.add_argument("--json", action="store_true")
        if name == "reboot":
            cmd.add_argument("--wait", action="store_true", help="follow each phone until it has registered again")
            cmd.add_argument("--timeout", type=float, help="seconds to wait for each phone (default 600)")

    commands.add_parser("check-config", help="read the config file and every plugin table; exit 1 on an error")
    commands.add_parser("reload", help="make the running server re-read its config (routes, emergency, trusted)")
    trace = commands.add_parser("trace", help="log every SIP message of a user, address or Call-ID for N minutes")
    trace.add_argument("--user")
    trace.add_argument("--address")
    trace.add_argument("--call-id")
    trace.add_argument("--minutes", type=float, default=5.0)
    trace.add_argument("--stop", action="store_true", help="stop the running trace")
    level = commands.add_parser("log-level", help="show the log level, or set debug (a line per request and "
                                                  "routing decision) for N minutes, or back to info")
    level.add_argument("level", nargs="?", choices=("debug", "info"))
    level.add_argument("--minutes", type=float, default=10.0)
    peers = commands.add_parser("peers", help="SIP-SRST peers: up, catching up or down (why), lag, how far behind")
    peers.add_argument("--json", action="store_true")
    gws = commands.add_parser("gateways", help="the routes' gateways: up, or down since when (needs the running server)")
    gws.add_argument("--json", action="store_true")
    regs = commands.add_parser("registrations", help="list current registrations (needs the running server)")
    regs.add_argument("user", nargs="?", help="only this user's (or AoR's) registrations")
    regs.add_argument("--json", action="store_true")
    unreg = commands.add_parser("unregister", help="remove a user's registrations now (all, or one contact)")
    unreg.add_argument("aor", help="a user name or sip:user@domain")
    unreg.add_argument("contact", nargs="?", help="only this contact URI")
    lookup = commands.add_parser("lookup", help="one user: account, registrations, forwarding")
    lookup.add_argument("user")
    lookup.add_argument("--json", action="store_true")
    calls = commands.add_parser("calls", help="the calls in progress: caller, callee, state, since when (needs the "
                                              "running server)")
    calls.add_argument("--json", action="store_true")
    ban = commands.add_parser("ban", help="the policy plugin's banned sources: list, add, remove (needs the "
                                          "running server with [plugins] enabled = [\"policy\", ...])")
    ban_commands = ban.add_subparsers(dest="ban_command", metavar="ACTION", required=True)
    ban_list = ban_commands.add_parser("list", help="the bans in force: address, until, rule, reason")
    ban_list.add_argument("--json", action="store_true")
    ban_add = ban_commands.add_parser("add", help="ban an address (an IPv6 address bans its /64)")
    ban_add.add_argument("address")
    ban_add.add_argument("--minutes", type=float, help="how long (default [plugins.policy.flood] ban_minutes)")
    ban_add.add_argument("--reason", default="banned by the administrator")
    ban_remove = ban_commands.add_parser("remove", help="lift a ban")
    ban_remove.add_argument("address")
    from proxy.plugin import IAdminCommands, find_factories

    for name, factory in sorted(find_factories().items()):
        if IAdminCommands.providedBy(factory):
            before = set(commands.choices)
            factory.add_commands(commands)
            for command in set(commands.choices) - before:
                commands.choices[command].set_defaults(plugin=name)
    return parser


class AdminTools:
    """What a plugin's command may use (IAdminCommands): the running server's admin API."""

    def __init__(self, config: ProxyConfig):
        self.config = config

    def get(self, path: str, timeout: float = 5.0) -> dict:
        return api_get(self.config, path, timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 10.0) -> dict:
        return api_request(self.config, method, path, body, timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        config = load_config(args.config)
        if args.command in ("user", "forward"):
            # Say which files are edited: a config file elsewhere means another state directory.
            print(f"(state directory {os.path.abspath(config.server.state_dir)})", file=sys.stderr)
        if args.command == "user":
            return _user(config, args)
        if args.command == "trace":
            if args.stop:
                api_request(config, "DELETE", "/api/trace")
                print("trace stopped")
                return 0
            result = api_request(config, "POST", "/api/trace", {"user": args.user, "address": args.address,
                                                                 "call_id": args.call_id, "minutes": args.minutes})
            print(f"tracing {result['tracing']} until {time.strftime('%H:%M:%S', time.localtime(result['until']))}: "
                  "see the server's log (journalctl -u sipproxy)")
            return 0
        if args.command == "log-level":
            if args.level is None:
                result = api_get(config, "/api/log-level")
            else:
                result = api_request(config, "POST", "/api/log-level", {"level": args.level, "minutes": args.minutes})
            until = result.get("until")
            print(result["level"] + (f" until {time.strftime('%H:%M:%S', time.localtime(until))}" if until else ""))
            return 0
        if args.command == "reload":
            result = api_request(config, "POST", "/api/reload")
            print(f"reloaded: {', '.join(result['reloaded']) or 'nothing changed'}")
            if result["restart_needed"]:
                print(f"a restart is needed for: {', '.join(result['restart_needed'])}")
            return 0
        if args.command == "peers":
            answer = api_get(config, "/api/peers")
            if not answer["role"] and not args.json:
                print(f"no SRST replication: set [srst] role (docs/srst.md) in {config.path}")
                return 0
            return _show(answer["peers"], args.json, "no peers", ("PEER", "NODE", "STATE", "LAG", "BEHIND", "APPLIED",
                                                                   "RESYNCS", "LAST ERROR"),
                         lambda r: (r["peer"], r["node"] or "?", r["state"].upper() if r["state"] == "down" else r["state"],
                                    "-" if r["lag_seconds"] is None else f"{r['lag_seconds']}s",
                                    "-" if r["behind"] is None else str(r["behind"]), str(r["applied"]),
                                    str(r["resyncs"]), r["last_error"] or "-"))
        if args.command == "gateways":
            rows = api_get(config, "/api/gateways")["gateways"]
            return _show(rows, args.json, "no gateway has had a call yet", ("GATEWAY", "STATE", "FAILURES", "CALLS"),
                         lambda r: (r["gateway"], "up" if r["up"] else f"DOWN since {time.ctime(r['down_since'])}",
                                    str(r["failures_in_a_row"]), f"{r['calls']} ({r['failed_calls']} failed)"))
        if args.command == "check-config":
            return _check_config(config)
        if args.command == "unregister":
            return _unregister(config, args)
        if args.command == "lookup":
            return _lookup(config, args)
        if args.command == "registrations":
            return _registrations(config, args)
        if args.command == "forward":
            return _forward(config, args)
        if args.command == "phones":
            return _phones(config, args)
        if args.command in ("reboot", "push-dialplan"):
            return _reboot(config, args)
        if args.command == "ban":
            return _ban(config, args)
        if args.command == "calls":
            rows = api_get(config, "/api/calls")["calls"]
            return _show(rows, args.json, "no calls in progress", ("CALLER", "CALLEE", "STATE", "SINCE", "WORKER"),
                         lambda c: (c["caller"], c["callee"], c["state"] + (f" ({c['transfer']} to {c['transfer_to']})"
                                                                             if c["transfer"] else ""),
                                    time.strftime("%H:%M:%S", time.localtime(c["answered_at"] or c["started_at"])),
                                    str(c["worker"] if c["worker"] is not None else "-")))
        if getattr(args, "plugin_command", None) is not None:
            if args.plugin not in config.plugins.enabled:
                raise AdminError(f"{args.command} needs the {args.plugin} plugin: add it to [plugins] enabled in "
                                 f"{config.path}")
            return args.plugin_command(config, args, AdminTools(config))
    except (ConfigError, AdminError, UserFileError, ForwardingError, CommandError, RedisUnavailable) as e:
        print(f"sipproxy-admin: {e}", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


def _users_path(config: ProxyConfig) -> str:
    return os.path.join(config.server.shared, USERS_FILE)


def _password(given: str | None, name: str) -> str:
    if given is not None:
        if not given:
            raise AdminError("the password must not be empty")
        return given
    first = getpass.getpass(f"Password for {name}: ")
    second = getpass.getpass("Again: ")
    if first != second:
        raise AdminError("the passwords differ")
    if not first:
        raise AdminError("the password must not be empty")
    return first


def _line_names(names) -> tuple[str, ...]:
    for line in names:
        if not valid_user_name(line):
            raise AdminError(f"{line!r} cannot be a line name")
    return tuple(dict.fromkeys(names))


def _user(config: ProxyConfig, args) -> int:
    path = _users_path(config)
    realm = config.realm
    action = args.user_command
    if action == "list":
        users = sorted(read_users(path).values(), key=lambda u: u.name)
        if args.json:
            print(json.dumps([{"name": u.name, "realm": u.realm, "display_name": u.display_name, "lines": list(u.lines),
                               "classes": list(u.classes)} for u in users], indent=1))
        else:
            for u in users:
                stale = "" if u.realm == realm else f"  (realm {u.realm!r} differs from {realm!r}: set the password again)"
                also = f"\tlines: {','.join(u.lines)}" if u.lines else ""
                also += f"\tclasses: {','.join(u.classes)}" if u.classes else ""
                print(f"{u.name}\t{u.display_name}{also}{stale}")
        return 0
    if action == "import":
        return _import_users(path, realm, args)
    name = args.name
    if action == "add":
        if not valid_user_name(name):
            raise AdminError(f"{name!r} cannot be a user name (letters, digits and -_.!~*'()&=+$,;?/ only)")
        if name.upper() == "UNPROVISIONED":
            raise AdminError("UNPROVISIONED is the phones' default auth name, not a user")
        extra_lines = _line_names([x for x in args.lines.split(",") if x])
        password = _password(args.password, name)
        with locked_users(path) as users:
            if name in users:
                raise AdminError(f"user {name} exists; use 'user passwd'")
            users[name] = UserRecord(name=name, realm=realm, ha1=compute_ha1(name, realm, password),
                                     display_name=args.display_name, lines=extra_lines)
        print(f"added {name}")
        return 0
    if action == "passwd":
        password = _password(args.password, name)
        with locked_users(path) as users:
            if name not in users:
                raise AdminError(f"no user {name}")
            users[name] = attrs.evolve(users[name], realm=realm, ha1=compute_ha1(name, realm, password))
        print(f"password of {name} set")
        return 0
    if action == "lines":
        extra_lines = _line_names(args.line)
        with locked_users(path) as users:
            if name not in users:
                raise AdminError(f"no user {name}")
            users[name] = attrs.evolve(users[name], lines=extra_lines)
        print(f"{name} may register: {', '.join((name,) + extra_lines)}")
        return 0
    if action == "set":
        return _set_user(config, path, name, args)
    if action == "remove":
        with locked_users(path) as users:
            record = users.pop(name, None)
            if record is None:
                raise AdminError(f"no user {name}")
            # Its own AoR, and the lines only it could register (a line that is a user itself stays).
            forget = [name] + [line for line in record.lines if line not in users]
        print(f"removed {name} from {path}")
        _forget_user(config, name, forget)
        return 0
    raise AdminError(f"unknown action {action}")


def _set_user(config: ProxyConfig, path: str, name: str, args) -> int:
    changes = {}
    if args.display_name is not None:
        changes["display_name"] = args.display_name
    if args.classes is not None:
        classes = tuple(dict.fromkeys(c.strip() for c in args.classes.split(",") if c.strip()))
        known = _policy_classes(config)
        unknown = [c for c in classes if known is not None and c not in known]
        if unknown:
            raise AdminError(f"no dial class {', '.join(unknown)} in [plugins.policy.classes] of {config.path} "
                             f"(known: {', '.join(sorted(known))})")
        changes["classes"] = classes
    if not changes:
        raise AdminError("nothing to set: give --display-name or --classes")
    with locked_users(path) as users:
        if name not in users:
            raise AdminError(f"no user {name}")
        users[name] = record = attrs.evolve(users[name], **changes)
    if "classes" in changes:
        print(f"{name} may dial: {', '.join(record.classes) or 'the [plugins.policy.allow] default'}")
    if "display_name" in changes:
        print(f"{name} is shown as {record.display_name!r}")
    return 0


def _ban(config: ProxyConfig, args) -> int:
    if "policy" not in config.plugins.enabled:
        raise AdminError(f"the policy plugin is not enabled in {config.path} ([plugins] enabled)")
    action = args.ban_command
    if action == "list":
        bans = api_get(config, "/policy/bans")["bans"]
        return _show(bans, args.json, "no bans in force", ("ADDRESS", "UNTIL", "RULE", "REASON"),
                     lambda b: (b["address"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b["until"])),
                                b["rule"], b["reason"]))
    if action == "add":
        body = {"address": args.address, "reason": args.reason}
        if args.minutes is not None:
            body["minutes"] = args.minutes
        ban = api_request(config, "POST", "/policy/bans", body)["banned"]
        print(f"banned {ban['address']} until {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ban['until']))}")
        return 0
    lifted = api_request(config, "DELETE", "/policy/bans/" + urllib.parse.quote(args.address, safe=""))["lifted"]
    print(f"lifted the ban of {lifted['address']}")
    return 0


def _policy_classes(config: ProxyConfig) -> set[str] | None:
    """The class names the policy plugin knows (its built-in ones too), or None when it is not enabled."""
    if "policy" not in config.plugins.enabled:
        return None
    from proxy.plugin import resolve

    for item in resolve(config.plugins.enabled, config.plugins.tables, config.path):
        if item.name == "policy":
            return item.config.class_names()
    return None


def csv_rows(file: str) -> list[list[str]]:
    """The rows of a site list (CSV, '-' for stdin), without blank rows and # comments: for the import commands."""
    import csv

    handle = sys.stdin if file == "-" else open(file, newline="", encoding="utf-8")
    try:
        return [row for row in csv.reader(handle) if row and not row[0].lstrip().startswith("#")]
    finally:
        if handle is not sys.stdin:
            handle.close()


def _import_users(path: str, realm: str, args) -> int:
    """Many users at once (a site's phone list): all rows are checked before anything is written."""
    rows = csv_rows(args.file)
    prepared = []
    for number, row in enumerate(rows, 1):
        name = row[0].strip()
        password = row[1].strip() if len(row) > 1 else ""
        if name.lower() in ("name", "user") and number == 1:
            continue  # a header row
        if not valid_user_name(name) or name.upper() == "UNPROVISIONED":
            raise AdminError(f"{args.file}: row {number}: {name!r} cannot be a user name")
        if not password:
            raise AdminError(f"{args.file}: row {number}: no password for {name}")
        display = row[2].strip() if len(row) > 2 else ""
        extra = _line_names([x for x in (row[3].replace(";", " ").split() if len(row) > 3 else []) if x])
        prepared.append(UserRecord(name=name, realm=realm, ha1=compute_ha1(name, realm, password),
                                   display_name=display, lines=extra))
    added = updated = 0
    with locked_users(path) as users:
        clashes = [u.name for u in prepared if u.name in users]
        if clashes and not args.update:
            raise AdminError(f"users exist already: {', '.join(clashes)} (--update sets their passwords)")
        for record in prepared:
            updated += record.name in users
            added += record.name not in users
            users[record.name] = record
    print(f"imported {len(prepared)} user(s): {added} added, {updated} updated")
    return 0


def _check_config(config: ProxyConfig) -> int:
    """The whole file and every enabled plugin's table, as the server reads them at startup."""
    from proxy.plugin import resolve

    resolve(config.plugins.enabled, config.plugins.tables, config.path)
    print(f"{config.path}: OK ({len(config.plugins.enabled)} plugin(s): {', '.join(config.plugins.enabled) or 'none'})")
    return 0


def _forget_user(config: ProxyConfig, name: str, users: list[str]) -> None:
    """A removed user must stop receiving calls now, not when its bindings expire: bindings and forwarding go too."""
    store = _forwarding_store(config)
    try:
        store.put(ForwardSettings(user=name))  # empty settings: the row is deleted
        print(f"  forwarding of {name} cleared")
    except RedisUnavailable as e:
        print(f"  forwarding of {name} NOT cleared ({e}): run `sipproxy-admin forward clear {name}` when it is back")
    finally:
        store.close()
    for user in users:
        aor = f"sip:{user}@{config.server.domains[0]}"
        quoted = urllib.parse.quote(aor, safe="")
        try:
            removed = api_request(config, "DELETE", f"/api/registrations/{quoted}")["removed"]
        except AdminError as e:
            if config.location.backend == "redis":
                print(f"  bindings of {aor} NOT removed ({e}); they expire by themselves")
                continue
            # The server is not running: its bindings are only in the file, and go from there.
            location = SqliteLocationService(os.path.join(config.server.state_dir, LOCATION_FILE), _WallClock())
            try:
                removed = len(location.lookup(aor))
                location.remove_all(aor)
            finally:
                location.stop()
            print(f"  ({e}; removed from the file instead)")
        print(f"  {removed} binding(s) of {aor} removed")


def _forwarding_store(config: ProxyConfig):
    """The settings where the server reads them: the SQLite file, or Redis (several nodes; the nodes are told)."""
    if config.location.backend == "redis":
        from proxy.routing.redis_forwarding import BlockingForwardingStore

        return BlockingForwardingStore(config.location)
    return ForwardingStore(os.path.join(config.server.state_dir, LOCATION_FILE))


class _WallClock:
    """The CLI's clock for a location file it opens itself (no reactor here)."""

    @staticmethod
    def seconds() -> float:
        return time.time()

    def callLater(self, *args, **kwargs):  # the sweeper is never started by the CLI
        raise RuntimeError("no timers in the CLI")


def _forward(config: ProxyConfig, args) -> int:
    """Forwarding settings are edited in the state store directly: the running server reads them per call."""
    store = _forwarding_store(config)
    try:
        action = args.forward_command
        if action == "set":
            changes = {}
            for kind, value in (("always", args.always), ("busy", args.busy), ("no_answer", args.no_answer),
                                ("unavailable", args.unavailable)):
                if value is not None:
                    changes[kind] = check_target(value)
            if args.after is not None:
                changes["no_answer_after"] = args.after
            if not changes:
                raise AdminError("say what to set: --always, --busy, --no-answer [--after N], --unavailable")
            settings = store.update(args.user, **changes)
            print(_describe(settings))
            return 0
        if action == "clear":
            kinds = [k for k in ("always", "busy", "no_answer", "unavailable") if getattr(args, k)]
            settings = store.update(args.user, **{k: "" for k in (kinds or ["always", "busy", "no_answer", "unavailable"])})
            print(_describe(settings))
            return 0
        rows = [store.get(args.user)] if args.user else store.all()
        if args.json:
            print(json.dumps([r.as_json() for r in rows], indent=1))
        else:
            for row in rows:
                print(_describe(row))
        return 0
    finally:
        store.close()


def _describe(s) -> str:
    parts = []
    if s.always:
        parts.append(f"always -> {s.always}")
    if s.busy:
        parts.append(f"busy -> {s.busy}")
    if s.no_answer:
        parts.append(f"no answer ({s.no_answer_after} s) -> {s.no_answer}")
    if s.unavailable:
        parts.append(f"unavailable -> {s.unavailable}")
    return f"{s.user}: " + ("; ".join(parts) if parts else "no forwarding")


def _line(aor: str) -> str:
    """sip:1001@example.com -> 1001"""
    return aor.partition(":")[2].partition("@")[0]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    table = [header] + rows
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def _show(rows: list[dict], as_json: bool, empty: str, header: tuple[str, ...], to_row) -> int:
    """Rows from the API as JSON, or as a table (or `empty` when there are none)."""
    if as_json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print(empty)
    else:
        _table(header, [to_row(r) for r in rows])
    return 0


def _phones(config: ProxyConfig, args) -> int:
    query = urllib.parse.urlencode({k: v for k, v in (("firmware", args.firmware), ("model", args.model),
                                                      ("where", args.where)) if v})
    rows = api_get(config, "/api/phones" + (f"?{query}" if query else ""))["phones"]
    if rows and "reachable" in rows[0]:  # the phone keepalive is on
        return _show(rows, args.json, "no phones",
                     ("PHONE", "LINES", "MODEL", "FIRMWARE", "ADDRESS", "REACHABLE", "RTT", "LAST REGISTERED"),
                     lambda r: (r["device"], ",".join(_line(a) for a in r["lines"]), r["model"] or "-",
                                r["firmware"] or r["user_agent"] or "-", r["address"],
                                {True: "yes", False: "NO", None: "?"}[r["reachable"]],
                                "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:g}ms",
                                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_registration"]))))
    return _show(rows, args.json, "no phones", ("PHONE", "LINES", "MODEL", "FIRMWARE", "ADDRESS", "LAST REGISTERED"),
                 lambda r: (r["device"], ",".join(_line(a) for a in r["lines"]), r["model"] or "-",
                            r["firmware"] or r["user_agent"] or "-", r["address"],
                            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_registration"]))))


def _reboot(config: ProxyConfig, args) -> int:
    body = {"lines": args.lines, "phones": args.phone, "all": args.all, "dry_run": args.dry_run,
            "push_dialplan": args.command == "push-dialplan"}
    for key in ("firmware", "model", "where", "rate"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.command == "reboot":
        body["wait"] = args.wait
        if args.timeout is not None:
            body["timeout"] = args.timeout
    if not (args.lines or args.phone or args.all or args.firmware or args.model or args.where):
        raise AdminError("name the phones: line names, --phone, --all, or --firmware/--model/--where")
    job = api_request(config, "POST", "/api/reboot", body)
    if args.dry_run:
        if args.json:
            print(json.dumps(job, indent=1))
            return 0
        print(f"would {'push the dial plan to' if job['kind'] == 'push-dialplan' else 'reboot'} "
              f"{len(job['phones'])} phone(s)" + ("" if job["syncinfo"] is None else f" after bumping {job['syncinfo']}"))
        for change in job.get("syncinfo_changes", []):
            scope = "every phone with no entry of its own" if change["version"] == "*" else \
                f"every phone running {change['version']}"
            print(f"  SYNC of {change['version']}: {change['old']} -> {change['new']} ({scope} reboots on its next "
                  "check-sync)")
        for phone in job["phones"]:
            print(f"--- {phone['device']} ({phone['address']})")
            print(phone["notify"].rstrip())
        for line in job["not_registered"]:
            print(f"--- {line}: not registered")
        return 0
    seen: dict[str, str] = {}
    wait_limit = time.monotonic() + (body.get("timeout", config.checksync.wait_timeout) if body.get("wait") else 0) \
        + len(job["phones"]) / max(body.get("rate", config.checksync.rate), 0.01) + 60
    while True:
        for phone in job["phones"]:
            state = phone["outcome"] or phone["state"]
            if seen.get(phone["device"]) != state and not args.json:
                seen[phone["device"]] = state
                print(_progress(phone))
        if job["done"] or time.monotonic() > wait_limit:
            break
        time.sleep(0.5)
        job = api_get(config, f"/api/jobs/{job['id']}")
    if args.json:
        print(json.dumps(job, indent=1))
    else:
        summary = ", ".join(f"{count} {state.replace('_', ' ')}" for state, count in sorted(job["summary"].items()))
        print(f"{job['kind']} job {job['id']}: {summary}")
    bad = {"refused", "no_answer", "not_registered", "not_back"}
    return 1 if any(k in bad for k in job["summary"]) else 0


def _progress(phone: dict) -> str:
    name = f"{phone['device']} ({','.join(_line(a) for a in phone['lines'])})"
    state = phone["outcome"] or phone["state"]
    detail = {
        "pending": "waiting its turn", "sent": "NOTIFY sent", "accepted": f"accepted ({phone['status']})",
        "refused": f"refused: {phone['status']} {phone['reason']}", "no_answer": "no answer",
        "not_registered": "not registered", "rebooted": f"back with firmware {phone['firmware_after']}",
        "same_firmware": f"back, still firmware {phone['firmware_after']}", "not_back": "not back within the timeout",
    }.get(state, state)
    return f"{name}: {detail}"


def api_get(config: ProxyConfig, path: str, timeout: float = 5.0) -> dict:
    return api_request(config, "GET", path, timeout=timeout)


def api_request(config: ProxyConfig, method: str, path: str, body: dict | None = None, timeout: float = 10.0) -> dict:
    """Call the running server's admin API."""
    base = api_base(config.admin.listen)
    token_path = os.path.join(config.server.state_dir, TOKEN_FILE)
    try:
        with open(token_path) as f:
            token = f.read().strip()
    except OSError as e:
        raise AdminError(f"cannot read the admin token {token_path}: {e.strerror} (has the server run?)") from None
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        try:
            detail = json.load(e).get("error", "")
        except ValueError:
            detail = ""
        raise AdminError(f"the server answered {e.code} for {path}" + (f": {detail}" if detail else "")) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise AdminError(f"cannot reach the server's admin API at {base}: {reason} (is it running?)") from None


def api_base(listen: str) -> str:
    """http://host:port from a `tcp:PORT:interface=ADDR` endpoint description."""
    parts = listen.split(":")
    port = next((p for p in parts[1:] if p.isdigit()), None)
    if port is None:
        port = next((p.split("=", 1)[1] for p in parts if p.startswith("port=")), None)
    interface = next((p.split("=", 1)[1] for p in parts if p.startswith("interface=")), "127.0.0.1")
    if interface in ("", "0.0.0.0", "::"):
        interface = "127.0.0.1"
    if port is None:
        raise AdminError(f"cannot tell the admin API address from admin.listen = {listen!r}")
    host = f"[{interface}]" if ":" in interface else interface
    return f"http://{host}:{port}"


def _aor(config: ProxyConfig, user: str) -> str:
    return user if user.startswith(("sip:", "sips:")) else f"sip:{user}@{config.server.domains[0]}"


def _unregister(config: ProxyConfig, args) -> int:
    aor = _aor(config, args.aor)
    path = f"/api/registrations/{urllib.parse.quote(aor, safe='')}"
    if args.contact:
        path += "?" + urllib.parse.urlencode({"contact": args.contact})
    removed = api_request(config, "DELETE", path)["removed"]
    print(f"{removed} binding(s) of {aor} removed")
    return 0 if removed else 1


def _lookup(config: ProxyConfig, args) -> int:
    """Everything about one user in one place: as kamctl ul show / opensips-cli would."""
    name = args.user
    record = read_users(_users_path(config)).get(name)
    aor = _aor(config, name)
    bindings = [b for b in api_get(config, "/api/registrations")["registrations"] if b["aor"] == aor]
    store = _forwarding_store(config)
    try:
        forwarding = store.get(name)
    finally:
        store.close()
    found = {"user": name, "aor": aor, "account": None if record is None else
             {"display_name": record.display_name, "lines": list(record.lines), "realm": record.realm},
             "registrations": bindings, "forwarding": None if forwarding.is_empty() else forwarding.as_json()}
    if args.json:
        print(json.dumps(found, indent=1))
        return 0 if record is not None or bindings else 1
    if record is None:
        print(f"{name}: no such user")
    else:
        also = f", may also register {', '.join(record.lines)}" if record.lines else ""
        print(f"{name} ({record.display_name or 'no display name'}{also})")
    for b in bindings:
        print(f"  registered {b['contact']} from {b['source']}/{b['transport'].lower()}, {b['expires_in']} s left, "
              f"{b['user_agent'] or 'no User-Agent'}")
    if not bindings:
        print("  not registered")
    if forwarding.is_empty():
        print("  no forwarding")
    else:
        for kind in ("always", "busy", "no_answer", "unavailable"):
            if getattr(forwarding, kind):
                after = f" after {forwarding.no_answer_after} s" if kind == "no_answer" else ""
                print(f"  forward {kind.replace('_', ' ')}{after} -> {getattr(forwarding, kind)}")
    return 0 if record is not None or bindings else 1


def _registrations(config: ProxyConfig, args) -> int:
    rows = api_get(config, "/api/registrations")["registrations"]
    if args.user:
        rows = [r for r in rows if r["aor"] == _aor(config, args.user)]
    if rows and "reachable" in rows[0]:  # the phone keepalive is on
        return _show(rows, args.json, "no registrations",
                     ("AOR", "CONTACT", "EXPIRES", "SOURCE", "REACHABLE", "RTT", "USER-AGENT", "INSTANCE"),
                     lambda r: (r["aor"], r["contact"], f"{r['expires_in']}s", f"{r['source']}/{r['transport'].lower()}",
                                {True: "yes", False: "NO", None: "?"}[r["reachable"]],
                                "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:g}ms",
                                r["user_agent"] or "-", r["mac"] or r["instance"] or "-"))
    if config.location.backend == "redis":  # several nodes: which one took each registration
        return _show(rows, args.json, "no registrations",
                     ("AOR", "CONTACT", "EXPIRES", "SOURCE", "NODE", "USER-AGENT", "INSTANCE"),
                     lambda r: (r["aor"], r["contact"], f"{r['expires_in']}s", f"{r['source']}/{r['transport'].lower()}",
                                r.get("node") or "-", r["user_agent"] or "-", r["mac"] or r["instance"] or "-"))
    return _show(rows, args.json, "no registrations", ("AOR", "CONTACT", "EXPIRES", "SOURCE", "USER-AGENT", "INSTANCE"),
                 lambda r: (r["aor"], r["contact"], f"{r['expires_in']}s", f"{r['source']}/{r['transport'].lower()}",
                            r["user_agent"] or "-", r["mac"] or r["instance"] or "-"))


if __name__ == "__main__":
    sys.exit(main())
