"""sipproxy-admin phone | tftp | upgrade: the provisioning plugin's commands (IAdminCommands).

`phone ...` and `tftp lint` work on the files alone (no running server needed); `tftp log` and
`upgrade run/status/cancel` ask the running server; `upgrade plan` asks it for the phones' firmware
unless `--from IMAGE` names one.
"""

import json
import os
import time

from plugins.provisioning.phones import MODELS, PhoneError, device_name
from plugins.provisioning.upgrade import PlanError, Refusal, image_for, plan, required_files, version
from proxy.errors import CommandError


def add_commands(commands) -> None:
    phone = commands.add_parser("phone", help="provision phones: SIP<MAC>.cnf, SIPDefault.cnf, dialplan.xml ... in "
                                              "the TFTP root (the provisioning plugin)")
    actions = phone.add_subparsers(dest="phone_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="provision a phone: its lines get generated passwords")
    add.add_argument("device", help="SEP<MAC> or the MAC address")
    add.add_argument("--model", required=True, choices=MODELS)
    add.add_argument("--lines", required=True, help="user names, comma-separated (line 1 first)")
    add.add_argument("--label", default="", help="phone_label: the top line of its display (11 characters)")
    add.add_argument("--replace", action="store_true", help="provision it again (new lines, model or label)")
    listing = actions.add_parser("list", help="the provisioned phones")
    listing.add_argument("--json", action="store_true")
    show = actions.add_parser("show", help="one phone: model, lines, image, and its files")
    show.add_argument("device")
    show.add_argument("--passwords", action="store_true", help="also the lines' passwords (as in SIP<MAC>.cnf)")
    show.add_argument("--json", action="store_true")
    remove = actions.add_parser("remove", help="unprovision a phone: its SIP<MAC>.cnf and SEP<MAC>.cnf.xml go")
    remove.add_argument("device")
    importing = actions.add_parser("import", help="provision phones from CSV: mac,model,lines[,label]")
    importing.add_argument("file", help="CSV, one phone a row; lines separated by ';' or spaces; '-' reads stdin")
    importing.add_argument("--replace", action="store_true")
    actions.add_parser("write", help="write every file again (after changing [plugins.provisioning])")
    phone.set_defaults(plugin_command=_phone)

    tftp = commands.add_parser("tftp", help="the TFTP root: lint it, or see what each phone fetched")
    tftp_actions = tftp.add_subparsers(dest="tftp_command", metavar="ACTION", required=True)
    lint = tftp_actions.add_parser("lint", help="check the TFTP root's files: each finding names file, line, remedy")
    lint.add_argument("--root", help="another directory than [plugins.provisioning] tftp_root")
    lint.add_argument("--json", action="store_true")
    tlog = tftp_actions.add_parser("log", help="what each phone asked the TFTP server for, and what that means "
                                              "(needs the running server)")
    tlog.add_argument("--phone", help="SEP<MAC> (or an address, before the phone named itself)")
    tlog.add_argument("--json", action="store_true")
    tftp.set_defaults(plugin_command=_tftp)

    upgrade = commands.add_parser("upgrade", help="firmware upgrades by the seeds' matrix: plan, run, status")
    up_actions = upgrade.add_subparsers(dest="upgrade_command", metavar="ACTION", required=True)
    up_plan = up_actions.add_parser("plan", help="the safe sequence of images for every phone (or one --from)")
    up_plan.add_argument("--to", required=True, help="the target image, e.g. P0S3-08-12-00")
    up_plan.add_argument("--from", dest="source", help="plan for one phone on this image (no server needed)")
    up_plan.add_argument("--where", help="only these phones, e.g. model=7960 or 'firmware<8.0'")
    up_plan.add_argument("--json", action="store_true")
    run = up_actions.add_parser("run", help="take the provisioned phones there, step by step (needs the server)")
    run.add_argument("--to", required=True)
    run.add_argument("--phones", default="", help="only these, comma-separated SEP<MAC> (default: all provisioned)")
    run.add_argument("--parallel", type=int, default=5, help="phones rebooting at once (default 5)")
    run.add_argument("--timeout", type=float, default=900.0, help="seconds a phone may take to come back per step")
    status = up_actions.add_parser("status", help="the upgrade run: each phone's step, state and why")
    status.add_argument("--json", action="store_true")
    up_actions.add_parser("cancel", help="start no further steps (phones rebooting now finish theirs)")
    upgrade.set_defaults(plugin_command=_upgrade)


def _site(config):
    from plugins.provisioning.site import Site
    from proxy.plugin import resolve

    for item in resolve(config.plugins.enabled, config.plugins.tables, config.path):
        if item.name == "provisioning":
            return Site(config, item.config)
    raise CommandError("the provisioning plugin is not enabled")


def _lines(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(x.strip() for x in text.replace(";", ",").replace(" ", ",").split(",") if x.strip()))


def _phone(config, args, admin) -> int:
    site = _site(config)
    action = args.phone_command
    if action == "add":
        phone, reset = site.add_phone(device_name(args.device), args.model, _lines(args.lines), args.label,
                                      replace=args.replace)
        print(f"provisioned {phone.device} ({phone.model}): lines {', '.join(phone.lines)}; files in {site.root}")
        for line in reset:
            print(f"  {line}: new generated password (sipproxy-admin phone show {phone.device} --passwords)")
        return 0
    if action == "list":
        phones = sorted(site.phones().values(), key=lambda p: p.device)
        if args.json:
            print(json.dumps([p.as_json() for p in phones], indent=1))
        elif not phones:
            print("no phones provisioned (sipproxy-admin phone add SEP<MAC> --model 7960 --lines 1001)")
        for p in phones if not args.json else ():
            print(f"{p.device}\t{p.model}\t{','.join(p.lines)}\t{p.label}\t{p.image or '(SIPDefault.cnf image)'}")
        return 0
    if action == "show":
        phone = site.phones().get(device_name(args.device))
        if phone is None:
            raise PhoneError(f"{device_name(args.device)} is not provisioned")
        data = phone.as_json(with_passwords=args.passwords)
        data["files"] = [f for f in (f"SIP{phone.mac}.cnf", f"SEP{phone.mac}.cnf.xml")
                         if os.path.exists(os.path.join(site.root, f))]
        if args.json:
            print(json.dumps(data, indent=1))
        else:
            for key, value in data.items():
                print(f"{key}: {value}")
        return 0
    if action == "remove":
        phone = site.remove_phone(device_name(args.device))
        print(f"removed {phone.device}: its files are gone; its users ({', '.join(phone.lines)}) stay")
        return 0
    if action == "import":
        return _import(site, args)
    written = site.write_all()
    print(f"wrote {len(written)} files in {site.root}")
    return 0


def _import(site, args) -> int:
    from proxy.admin.cli import csv_rows

    rows = csv_rows(args.file)
    prepared = []
    for number, row in enumerate(rows, 1):
        if number == 1 and row[0].strip().lower() in ("mac", "device"):
            continue
        if len(row) < 3:
            raise PhoneError(f"{args.file} row {number}: needs mac,model,lines[,label]")
        try:
            device = device_name(row[0])
        except PhoneError as e:
            raise PhoneError(f"{args.file} row {number}: {e}") from None
        model = row[1].strip()
        if model not in MODELS:
            raise PhoneError(f"{args.file} row {number}: model {model!r} (7940 or 7960)")
        prepared.append((device, model, _lines(row[2]), row[3].strip() if len(row) > 3 else ""))
    for device, model, lines, label in prepared:
        phone, reset = site.add_phone(device, model, lines, label, replace=args.replace)
        print(f"provisioned {phone.device}: {', '.join(phone.lines)}" + (f" (new passwords: {', '.join(reset)})"
                                                                        if reset else ""))
    return 0


def _tftp(config, args, admin) -> int:
    if args.tftp_command == "lint":
        from plugins.provisioning.lint import lint

        root = args.root or _site(config).root
        findings = lint(root)
        if args.json:
            print(json.dumps([f.as_json() for f in findings], indent=1))
        else:
            for finding in findings:
                print(finding)
            print(f"{root}: {len(findings)} finding(s)" if findings else f"{root}: nothing found")
        return 1 if any(f.severity == "error" for f in findings) else 0
    query = f"?phone={args.phone}" if args.phone else ""
    phones = admin.get(f"/provisioning/tftp-log{query}")["phones"]
    if args.json:
        print(json.dumps(phones, indent=1))
        return 0
    if not phones or not any(p["requests"] for p in phones.values()):
        print("no TFTP requests yet")
    for device, record in sorted(phones.items()):
        print(f"{device}:")
        for r in record["requests"]:
            print(f"  {time.strftime('%H:%M:%S', time.localtime(r['at']))} {r['address']} {r['name']}: {r['result']}"
                  + (f" ({r['bytes']} bytes)" if r["bytes"] else ""))
        for line in record["diagnosis"]:
            print(f"  ! {line}")
    return 0


def _upgrade(config, args, admin) -> int:
    action = args.upgrade_command
    if action == "plan":
        return _plan(config, args, admin)
    if action == "run":
        body = {"to": args.to, "parallel": args.parallel, "timeout": args.timeout,
                "phones": [device_name(d) for d in args.phones.split(",") if d.strip()]}
        run = admin.request("POST", "/provisioning/upgrade", body)["run"]
        print(f"upgrade to {run['target']} started: {run['summary']} (sipproxy-admin upgrade status)")
        return 0
    if action == "cancel":
        admin.request("DELETE", "/provisioning/upgrade")
        print("no further steps will start")
        return 0
    run = admin.get("/provisioning/upgrade")["run"]
    if args.json:
        print(json.dumps(run, indent=1))
        return 0
    if run is None:
        print("no upgrade run")
        return 0
    print(f"to {run['target']}: {run['summary']}" + (" (finished)" if run["done"] else ""))
    for p in run["phones"]:
        print(f"  {p['device']}\t{p['state']}\t{p['detail']}")
    return 0


def _plan(config, args, admin) -> int:
    target = args.to.upper()
    try:
        version(target)
    except PlanError as e:
        raise CommandError(str(e)) from None
    root = _site(config).root
    present = {n.lower() for n in os.listdir(root)} if os.path.isdir(root) else set()
    if args.source:
        rows = [{"device": "(--from)", "lines": [], "firmware": args.source}]
    else:
        query = f"?where={args.where}" if args.where else ""
        rows = [r for r in admin.get(f"/api/phones{query}")["phones"]]
    out = []
    for row in rows:
        entry = {"device": row["device"], "lines": row.get("lines", []), "firmware": row.get("firmware")}
        try:
            steps = plan(image_for(row["firmware"] or ""), target)
        except PlanError as e:
            steps = Refusal(str(e))
        if isinstance(steps, Refusal):
            entry["refused"] = steps.reason
        else:
            entry["steps"] = steps
            entry["files"] = {f: f.lower() in present for s in steps for f in required_files(s)}
        out.append(entry)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for entry in out:
        head = f"{entry['device']} ({entry['firmware'] or 'unknown firmware'})"
        if "refused" in entry:
            print(f"{head}: refused: {entry['refused']}")
        elif not entry["steps"]:
            print(f"{head}: already on {target}")
        else:
            print(f"{head}: {' -> '.join(entry['steps'])}")
            missing = [f for f, there in entry["files"].items() if not there]
            if missing:
                print(f"  needs in {root}: {', '.join(missing)}")
    return 0
